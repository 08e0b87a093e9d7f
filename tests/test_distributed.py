"""flux2ttr.distributed: the backend and GPU each torchrun rank takes (NCCL on cuda, one GPU per local
rank; gloo on the CPU), the launches that cannot work, and one process as rank 0 of 1 (every collective the
identity, JSON round trip included). The collectives across 2 real gloo ranks run in the capture, rollout and
distill torchrun tests."""

from __future__ import annotations

import pytest
import torch

from flux2ttr.distributed import Dist, DistError, Placement, init, plan_placement


def test_one_process_builds_no_group():
    assert plan_placement("cuda", 1, 0, cuda_available=True, cuda_count=8) == Placement(None, None)
    assert plan_placement("cpu", 1, 0, cuda_available=False, cuda_count=0) == Placement(None, None)


def test_cpu_ranks_use_gloo_and_cuda_ranks_nccl_on_their_local_gpu():
    assert plan_placement("cpu", 2, 1, cuda_available=True, cuda_count=2) == Placement("gloo", None)
    assert plan_placement("cuda", 4, 3, cuda_available=True, cuda_count=4) == Placement("nccl", 3)
    assert plan_placement("cuda", 16, 1, cuda_available=True, cuda_count=8) == Placement("nccl", 1)  # 2 nodes of 8


@pytest.mark.parametrize("device, local_rank, cuda, count, message", [
    ("cuda", 0, False, 0, "torch sees no CUDA GPU"),
    ("cuda:1", 0, True, 2, "would put every rank on one GPU"),
    ("cuda", 2, True, 2, "local rank 2 has no GPU of its own"),
])
def test_launches_that_cannot_work_are_refused(device, local_rank, cuda, count, message):
    with pytest.raises(DistError, match=message):
        plan_placement(device, 2, local_rank, cuda_available=cuda, cuda_count=count)


def test_init_refuses_cuda_ranks_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DistError, match="no CUDA GPU"):
        init("cuda", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})


def test_rank_0_of_1_collectives_are_the_identity():
    d = init("cpu", env={})
    assert (d.rank, d.world, d.backend, d.is_main, d.comm_device) == (0, 1, None, True, torch.device("cpu"))
    obj = {"a": (1, 2.5), "b": None, "π": "ü"}
    assert d.all_gather_json(obj) == [{"a": [1, 2.5], "b": None, "π": "ü"}]  # as on the wire: tuples are lists
    assert d.broadcast_json(obj) == {"a": [1, 2.5], "b": None, "π": "ü"}
    t = torch.arange(3.0)
    assert d.broadcast_tensor(t, src=0) is t
    d.barrier()
    d.close()
    with Dist() as again:
        assert again.world == 1
