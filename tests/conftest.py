"""Shared fixtures. Only the ComfyUI ones live here, and ComfyUI is imported lazily inside them so
that tests which do not use them never pay for it."""

from __future__ import annotations

import pytest

# fixtures that start the real ComfyUI: a test using one is a ComfyUI test
_COMFY_FIXTURES = {"comfy", "tiny_teacher"}


def pytest_collection_modifyitems(config, items):
    """Mark ComfyUI tests by the fixtures they use; skip GPU tests where CUDA is missing."""
    import torch

    no_cuda = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if _COMFY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def _comfy_on_gpu(session: pytest.Session) -> bool:
    """ComfyUI runs on the GPU when CUDA is there and every selected ComfyUI test is a GPU test
    (``pytest -m gpu``); otherwise on CPU (``--cpu``), and the GPU ComfyUI tests skip themselves."""
    import torch

    comfy_items = [i for i in session.items if _COMFY_FIXTURES & set(getattr(i, "fixturenames", ()))]
    return torch.cuda.is_available() and bool(comfy_items) and all(i.get_closest_marker("gpu") for i in comfy_items)


@pytest.fixture(scope="session")
def comfy(request, tmp_path_factory):
    """The real ComfyUI (``$COMFYUI_PATH``), started once per test process with temp folders, the
    built-in nodes, the test-only nodes and the flux2ttr pack loaded by ``nodes.load_custom_node``;
    on CPU, or on the GPU where only GPU tests use it (see :func:`_comfy_on_gpu`)."""
    from helpers import comfy as comfy_harness

    instance = comfy_harness.start_comfy(tmp_path_factory.mktemp("comfyui"), gpu=_comfy_on_gpu(request.session))
    assert comfy_harness.load_pack(instance), "nodes.load_custom_node failed on comfy_nodes/ (see the log above)"
    return instance


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The tiny FLUX.2 teacher as a single-file safetensors (what UNETLoader loads)."""
    from helpers import comfy as comfy_harness

    return comfy_harness.tiny_teacher_file(tmp_path_factory.mktemp("teacher"))
