"""Ranks under ``torchrun``: which backend and device a rank uses, and the few collectives the stages need.

``torchrun --nproc-per-node N -m stages.<name>`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and the rendezvous) in their environment; :func:`init` turns that into a :class:`Dist`.
A plain ``python -m stages.<name>`` (or torchrun with one process) is rank 0 of 1 and builds no process
group: every collective of :class:`Dist` is then the identity, so one code path serves both.

Backend and device (:func:`plan_placement`): a stage that computes on ``cuda`` gets NCCL, and each rank
takes the GPU ``LOCAL_RANK`` (``torch.cuda.set_device``), so ``device: cuda`` in ``params.yaml`` means "this
rank's GPU" and the same params run on 1 or N GPUs; a stage on the CPU gets gloo. ``cuda:<i>`` under torchrun
would put every rank on one GPU and is refused.

Collectives carry tensors on the group's device (the rank's GPU for NCCL, the CPU for gloo). Objects go over
the wire as JSON (UTF-8 bytes in a uint8 tensor), never pickle: a rank only ever decodes data, not code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flux2ttr.config import Flux2TTRError


class DistError(RuntimeError, Flux2TTRError):
    """The torchrun launch does not fit the stage's device (message says what to change)."""


@dataclass(frozen=True)
class Placement:
    """Where one rank runs: ``backend`` ``"nccl"`` / ``"gloo"`` (``None``: one process, no group) and the
    ``cuda_index`` it takes (``None``: the CPU, or one process left on torch's current GPU)."""

    backend: str | None
    cuda_index: int | None


def plan_placement(device: str, world: int, local_rank: int, cuda_available: bool, cuda_count: int) -> Placement:
    """The backend and GPU of a rank computing on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:<i>"``) in a
    ``world``-rank launch, ``local_rank`` on its host with ``cuda_count`` visible GPUs.

    Pure (no torch calls): :func:`init` passes torch's view of the machine. Raises :class:`DistError` for
    a cuda stage without CUDA, ``cuda:<i>`` under torchrun, or more local ranks than GPUs."""
    dev = str(device)
    if world <= 1:
        return Placement(None, None)
    if not dev.startswith("cuda"):
        return Placement("gloo", None)
    if not cuda_available:
        raise DistError(f"device {dev!r} under torchrun, but torch sees no CUDA GPU; set the device to cpu "
                        "(gloo) or run on a GPU machine")
    if dev != "cuda":
        raise DistError(f"device {dev!r} under torchrun would put every rank on one GPU; set it to 'cuda' "
                        "(each rank takes GPU LOCAL_RANK)")
    if not 0 <= local_rank < cuda_count:
        raise DistError(f"local rank {local_rank} has no GPU of its own ({cuda_count} visible); launch at most "
                        f"{cuda_count} processes per node (torchrun --nproc-per-node)")
    return Placement("nccl", int(local_rank))


class Dist:
    """This process's place in the launch: ``rank`` of ``world`` (``local_rank`` on its host), the group's
    ``backend`` (``None`` for one process) and the collectives over it. Every rank must make the same
    collective calls in the same order. Use as a context manager: :meth:`close` destroys the group when
    :func:`init` created it (a group that existed before is left to its owner)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None,
                 cuda_index: int | None = None, owns: bool = False) -> None:
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend, self.cuda_index, self._owns = backend, cuda_index, owns

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes a stage's outputs."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the rank's GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.cuda_index if self.cuda_index is not None else torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-serialisable), in rank order."""
        if self.world == 1:
            return [json.loads(json.dumps(obj))]  # the same round trip as on the wire (tuples become lists)
        import torch.distributed as dist  # noqa: PLC0415

        data = _encode(obj, self.comm_device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.comm_device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=self.comm_device))
        lengths = [int(s.item()) for s in sizes]
        cap = max(lengths)
        padded = torch.zeros(cap, dtype=torch.uint8, device=self.comm_device)
        padded[:data.numel()] = data
        bufs = [torch.zeros(cap, dtype=torch.uint8, device=self.comm_device) for _ in range(self.world)]
        dist.all_gather(bufs, padded)  # all_gather wants equal sizes: padded to the longest
        return [_decode(b[:n]) for b, n in zip(bufs, lengths)]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (the others' argument is ignored)."""
        if self.world == 1:
            return json.loads(json.dumps(obj))
        import torch.distributed as dist  # noqa: PLC0415

        data = _encode(obj if self.rank == src else None, self.comm_device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(size, src=src)
        buf = data if self.rank == src else torch.zeros(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        dist.broadcast(buf, src=src)
        return _decode(buf)

    def broadcast_tensor(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank, same shape, dtype and device as the ``t`` each rank passed
        (the others' values are overwritten; moved through :attr:`comm_device` when it differs)."""
        if self.world == 1:
            return t
        import torch.distributed as dist  # noqa: PLC0415

        buf = t.detach().to(self.comm_device).contiguous()
        dist.broadcast(buf, src=src)
        return buf.to(t.device)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init` created it (idempotent). No barrier: after an error on
        one rank a barrier would hang the others."""
        if self._owns:
            import torch.distributed as dist  # noqa: PLC0415

            self._owns = False
            dist.destroy_process_group()

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, backend={self.backend})"


def _encode(obj: Any, device: torch.device) -> torch.Tensor:
    raw = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    return torch.from_numpy(raw.copy()).to(device)


def _decode(buf: torch.Tensor) -> Any:
    return json.loads(buf.cpu().numpy().tobytes().decode())


def init(device: str = "cpu", env: Mapping[str, str] | None = None) -> Dist:
    """This process's :class:`Dist` for a stage computing on ``device``: under torchrun (``WORLD_SIZE`` > 1)
    it sets this rank's GPU (cuda) and initialises the process group (NCCL on cuda, gloo on the CPU) unless
    one exists already; otherwise rank 0 of 1, no group. ``env`` defaults to ``os.environ``."""
    import torch.distributed as dist  # noqa: PLC0415

    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():  # a caller's group (a test worker, a notebook): reuse it
        backend = str(dist.get_backend())
        index = torch.cuda.current_device() if backend == "nccl" else None
        return Dist(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", "0")), backend, index)
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    place = plan_placement(device, world, local_rank, cuda, torch.cuda.device_count() if cuda else 0)
    if place.backend is None:
        return Dist()
    if not dist.is_available():
        raise DistError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if place.cuda_index is not None:
        torch.cuda.set_device(place.cuda_index)  # before the group: NCCL binds each rank to its current GPU
    dist.init_process_group(place.backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, place.backend, place.cuda_index, owns=True)
