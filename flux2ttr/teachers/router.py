"""The attention router: the one hook every later part of flux2ttr uses.

It is installed into a diffusers ``Flux2Transformer2DModel`` as custom attention processors that
reproduce diffusers' ``Flux2ParallelSelfAttnProcessor`` (single blocks) and ``Flux2AttnProcessor``
(double blocks) exactly and replace only the attention call. Per layer (ComfyUI key, e.g.
``single_blocks.3``) the call is

* pass-through: diffusers' own ``dispatch_attention_fn`` on the untouched tensors (bit-identical to the
  unpatched model),
* student: ``student(q, k, v, n_cond, sigma, cfg, height=, width=)`` with ``q, k, v [B, H, N, D]`` after
  QK-norm and RoPE, returning ``[B, H, N, D]``,

and observers (capture hooks) ``fn(key, q, k, v, out, n_cond, state)`` see every observed layer's
native softmax output ``out [B, H, N, D]``. ``router.state`` (a :class:`~flux2ttr.contract.RunState`)
is set by the sampler before each denoiser call; ``n_cond`` of a single block is ``N - height*width``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from flux2ttr.contract import RunState, layer_key, layer_sort_key

Observer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, "RunState | None"], None]
RouteFn = Callable[[RunState | None], Iterable[str]]


class RouterError(RuntimeError):
    """The router was asked for something it cannot do (unknown layer, no state, missing student)."""


def _diffusers_flux2():
    # diffusers is imported lazily: importing flux2ttr.teachers.router must stay cheap.
    from diffusers.models.transformers import transformer_flux2 as tf2  # noqa: PLC0415

    return tf2


class _RoutedProcessor:
    """Shared part of the two processors: attention backend settings copied from the original."""

    def __init__(self, router: AttentionRouter, key: str, original: Any) -> None:
        self.router = router
        self.key = key
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _attend(self, query, key, value, attention_mask, n_cond: int | None) -> torch.Tensor:
        """``query, key, value [B, N, H, D]`` (diffusers layout) -> ``[B, N, H, D]``."""
        tf2 = _diffusers_flux2()

        def native() -> torch.Tensor:
            return tf2.dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        return self.router._call(self.key, query, key, value, n_cond, native)


class RoutedSingleProcessor(_RoutedProcessor):
    """diffusers' ``Flux2ParallelSelfAttnProcessor`` math with the attention call routed."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tf2 = _diffusers_flux2()
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = tf2.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = tf2.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, n_cond=None)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


class RoutedDoubleProcessor(_RoutedProcessor):
    """diffusers' ``Flux2AttnProcessor`` math with the attention call routed (text tokens first)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tf2 = _diffusers_flux2()
        query, key, value, encoder_query, encoder_key, encoder_value = tf2._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        n_cond = 0
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            n_cond = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = tf2.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = tf2.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, n_cond=n_cond)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class AttentionRouter:
    """Routes every FLUX.2 attention call of an installed model (see the module docstring).

    ``state``: the :class:`RunState` of the current denoiser call (the sampler sets it each step).
    ``include_double``: also route the double blocks (their attention is joint text+image, text first).
    """

    def __init__(self, *, include_double: bool = True) -> None:
        self.include_double = include_double
        self.state: RunState | None = None
        self.students: dict[str, Callable[..., torch.Tensor]] = {}
        self._route: set[str] | RouteFn = set()
        self._observers: list[tuple[Observer, frozenset[str] | None]] = []
        self._installed: list[tuple[nn.Module, Any]] = []
        self.layer_keys: list[str] = []
        self.calls: dict[str, int] = {}  # per layer: how many calls went to the student (for tests/logs)
        # how a teacher whose attention runs inside another framework routes the students:
        # ``external_patch(model, router) -> (routed model, calls)`` with ``calls() -> {layer: student calls}``
        # of the run (the comfyui teacher: the ComfyUI node's patch, set by routing.student_rollout.make_router)
        self.external_patch: Callable[[Any, AttentionRouter], tuple[Any, Callable[[], dict[str, int]]]] | None = None

    # --- routing API -----------------------------------------------------------------------------
    def set_students(self, students: dict[str, Callable[..., torch.Tensor]]) -> None:
        """Student callables (usually ``nn.Module``) by layer key; replaces the previous set."""
        self.students = {layer_key(k): s for k, s in students.items()}

    def set_route(self, route: Iterable[str] | RouteFn) -> None:
        """Layers that run their student: a set of keys, or ``fn(state) -> keys`` evaluated per call
        (per-step routing by a controller). Every other layer runs native softmax."""
        if callable(route):
            self._route = route
            return
        keys = {layer_key(k) for k in route}
        missing = sorted(keys - set(self.students))
        if missing:
            raise RouterError(f"route names layers without a student: {missing}; call set_students first")
        self._route = keys

    def routed_keys(self) -> set[str]:
        """The keys that run their student for the current ``state``."""
        return self.routed_keys_for(self.state)

    def routed_keys_for(self, state: RunState | None) -> set[str]:
        """The keys that run their student at ``state`` (a teacher that routes through another hook, such as
        ComfyUI's node patch, asks here per step)."""
        if callable(self._route):
            return {layer_key(k) for k in self._route(state)}
        return set(self._route)

    @property
    def has_observers(self) -> bool:
        """Whether any observer is registered."""
        return bool(self._observers)

    def observers_for(self, key: str) -> list[Observer]:
        """The observers registered for layer ``key`` (for teachers whose attention calls come through
        another hook and are handed to the observers there)."""
        return [fn for fn, layers in self._observers if layers is None or key in layers]

    def add_observer(self, fn: Observer, layers: Iterable[str] | None = None) -> Callable[[], None]:
        """Register ``fn(key, q, k, v, out, n_cond, state)`` (``[B, H, N, D]`` tensors, ``out`` the native
        softmax output) for ``layers`` (all when None). Returns a function that removes it.

        The tensors are transposed views of the model's own buffers: copy (``.contiguous()``/``.clone()``)
        what you keep. An observed layer that is routed to a student still reports the native output."""
        entry = (fn, None if layers is None else frozenset(layer_key(k) for k in layers))
        self._observers.append(entry)

        def remove() -> None:
            if entry in self._observers:
                self._observers.remove(entry)

        return remove

    def clear_observers(self) -> None:
        self._observers.clear()

    # --- installation ------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> AttentionRouter:
        """Put routed processors into every single (and, with ``include_double``, double) block of a
        diffusers ``Flux2Transformer2DModel``. Idempotent for the same model."""
        if self._installed:
            if any(m is mod for mod, _ in self._installed for m in model.modules()):
                return self
            raise RouterError("router already installed into another model; uninstall() first")
        keys = []
        for name, module in model.named_modules():
            parts = name.split(".")
            if len(parts) != 3 or parts[2] != "attn":
                continue
            block = ".".join(parts[:2])
            if parts[0] == "single_transformer_blocks":
                proc_cls = RoutedSingleProcessor
            elif parts[0] == "transformer_blocks" and self.include_double:
                proc_cls = RoutedDoubleProcessor
            else:
                continue
            key = layer_key(block)
            original = module.processor
            module.processor = proc_cls(self, key, original)
            self._installed.append((module, original))
            keys.append(key)
        if not keys:
            raise RouterError("no FLUX.2 attention blocks found: is this a diffusers Flux2Transformer2DModel?")
        self.layer_keys = sorted(keys, key=layer_sort_key)
        return self

    def uninstall(self) -> None:
        """Restore the original processors."""
        for module, original in self._installed:
            module.processor = original
        self._installed.clear()

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[AttentionRouter]:
        """Install for the duration of a ``with`` block (no-op if already installed in ``model``)."""
        was = self.installed
        self.install(model)
        try:
            yield self
        finally:
            if not was:
                self.uninstall()

    # --- the call ----------------------------------------------------------------------------------
    def _n_cond(self, key: str, n_tokens: int, n_cond: int | None) -> int:
        if n_cond is not None:
            return n_cond
        if self.state is None:
            raise RouterError(f"{key}: router.state is not set (the sampler sets it; n_cond = N - h*w needs it)")
        n_img = int(self.state.height) * int(self.state.width)
        if n_img > n_tokens:
            raise RouterError(f"{key}: state says {self.state.height}x{self.state.width} image tokens but the "
                              f"sequence has only {n_tokens} tokens")
        return n_tokens - n_img

    def _call(self, key: str, query, key_t, value, n_cond: int | None,
              native: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``query, key_t, value [B, N, H, D]`` (diffusers layout) -> ``[B, N, H, D]``."""
        observers = self.observers_for(key)
        use_student = key in self.routed_keys()
        if not observers and not use_student:
            return native()  # untouched tensors, diffusers' own call: bit-identical
        q, k, v = (t.transpose(1, 2) for t in (query, key_t, value))  # [B, H, N, D]
        n_cond = self._n_cond(key, q.shape[2], n_cond)
        if observers:
            out_native = native().transpose(1, 2)
            for fn in observers:
                fn(key, q, k, v, out_native, n_cond, self.state)
        if not use_student:
            return out_native.transpose(1, 2)
        student = self.students.get(key)
        if student is None:
            raise RouterError(f"{key}: routed to a student but none is set (set_students)")
        if self.state is None:
            raise RouterError(f"{key}: a student needs router.state (sigma, cfg, height, width)")
        out = student(q, k, v, n_cond, self.state.sigma, self.state.cfg,
                      height=int(self.state.height), width=int(self.state.width))
        if out.shape != q.shape:
            raise RouterError(f"{key}: student returned {tuple(out.shape)}, expected {tuple(q.shape)} [B, H, N, D]")
        self.calls[key] = self.calls.get(key, 0) + 1
        return out.to(query.dtype).transpose(1, 2)
