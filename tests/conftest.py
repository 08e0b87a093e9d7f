"""Shared fixtures. Only the ComfyUI ones live here, and ComfyUI is imported lazily inside them so
that tests which do not use them never pay for it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI (``$COMFYUI_PATH``), started once per test process with temp folders, the
    built-in nodes, the test-only nodes and the flux2ttr pack loaded by ``nodes.load_custom_node``."""
    import comfy_harness

    instance = comfy_harness.start_comfy(tmp_path_factory.mktemp("comfyui"))
    assert comfy_harness.load_pack(instance), "nodes.load_custom_node failed on comfy_nodes/ (see the log above)"
    return instance


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The tiny FLUX.2 teacher as a single-file safetensors (what UNETLoader loads)."""
    import comfy_harness

    return comfy_harness.tiny_teacher_file(tmp_path_factory.mktemp("teacher"))
