"""Student rollouts: a per-step mask routes layers to their students through the router."""

from __future__ import annotations

import pytest
import torch

from flux2ttr.routing.student_rollout import make_router, mask_route, run_student_rollout, schedule
from flux2ttr.students.artifacts import load_students
from flux2ttr.teachers.router import RouterError
from flux2ttr.teachers.sampler import SamplerConfig, sample
from helpers.rollouts import make_students, make_teacher

CFG = SamplerConfig(steps=3, height=48, width=32, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    teacher = make_teacher(tmp / "teacher")
    keys = teacher.single_layer_keys
    art = load_students(make_students(tmp / "s.safetensors", teacher, {k: True for k in keys}))
    return teacher, keys, art


class _Recorder(torch.nn.Module):
    """Wraps a student and records the sigma of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sigmas = inner, []

    def forward(self, q, k, v, n_cond, sigma, cfg, *, height, width):
        self.sigmas.append(float(sigma))
        return self.inner(q, k, v, n_cond, sigma, cfg, height=height, width=width)


def test_all_full_mask_is_the_teacher(setup):
    teacher, keys, art = setup
    router = make_router(teacher, art.layers)
    try:
        masks = torch.ones(CFG.steps, len(keys), dtype=torch.bool)
        res = run_student_rollout(teacher, router, ["a cat"], CFG, masks, keys, seeds=[5])
    finally:
        router.uninstall()
    ref = sample(teacher, ["a cat"], CFG, seeds=[5])
    assert torch.equal(res.latents, ref)
    assert res.student_calls == {} and res.seconds > 0
    torch.testing.assert_close(res.images, teacher.decode(ref, 3, 2))


def test_mask_routes_exactly_the_masked_layer_steps(setup):
    teacher, keys, art = setup
    rec = {k: _Recorder(art.layers[k]) for k in keys}
    router = make_router(teacher, rec)
    masks = torch.ones(CFG.steps, len(keys), dtype=torch.bool)
    masks[1, 0] = False  # layer 0 student at step 1
    masks[0, 2] = masks[2, 2] = False  # layer 2 student at steps 0 and 2
    try:
        res = run_student_rollout(teacher, router, ["a cat"], CFG, masks, keys, seeds=[5])
        assert router.routed_keys() == set()  # route cleared after the rollout
    finally:
        router.uninstall()
    sig = schedule(CFG)
    assert rec[keys[0]].sigmas == pytest.approx([float(sig[1])])
    assert rec[keys[1]].sigmas == []
    assert rec[keys[2]].sigmas == pytest.approx([float(sig[0]), float(sig[2])])
    assert res.student_calls == {keys[0]: 1, keys[2]: 2}
    ref = sample(teacher, ["a cat"], CFG, seeds=[5])
    assert not torch.allclose(res.latents, ref)  # random students change the result


def test_mask_shape_and_state_errors(setup):
    _, keys, _ = setup
    with pytest.raises(ValueError, match=r"\[steps, 3\]"):
        mask_route(torch.ones(2, 2, dtype=torch.bool), keys)
    route = mask_route(torch.zeros(2, 3, dtype=torch.bool), keys)
    with pytest.raises(RouterError, match="router.state"):
        route(None)
