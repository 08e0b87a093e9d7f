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


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI (``$COMFYUI_PATH``), started once per test process with temp folders, the
    built-in nodes, the test-only nodes and the flux2ttr pack loaded by ``nodes.load_custom_node``."""
    from helpers import comfy as comfy_harness

    instance = comfy_harness.start_comfy(tmp_path_factory.mktemp("comfyui"))
    assert comfy_harness.load_pack(instance), "nodes.load_custom_node failed on comfy_nodes/ (see the log above)"
    return instance


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The tiny FLUX.2 teacher as a single-file safetensors (what UNETLoader loads)."""
    from helpers import comfy as comfy_harness

    return comfy_harness.tiny_teacher_file(tmp_path_factory.mktemp("teacher"))
