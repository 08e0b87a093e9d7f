"""The attention-call contract helpers: key mapping and the softmax reference."""

import math

import pytest
import torch

from flux2ttr.contract import comfy_key, layer_key, layer_sort_key, softmax_attention


def test_layer_key_mapping():
    assert layer_key("single_transformer_blocks.7") == "single_blocks.7"
    assert layer_key("transformer_blocks.0") == "double_blocks.0"
    assert layer_key("single_blocks.3") == "single_blocks.3"
    with pytest.raises(ValueError, match="not a FLUX.2"):
        layer_key("blocks.1")
    assert comfy_key("single", 2) == "single_blocks.2"
    with pytest.raises(ValueError):
        comfy_key("triple", 0)
    keys = ["single_blocks.10", "double_blocks.1", "single_blocks.2", "double_blocks.0"]
    assert sorted(keys, key=layer_sort_key) == [
        "double_blocks.0", "double_blocks.1", "single_blocks.2", "single_blocks.10"]


def test_softmax_attention_matches_fp64_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8), -1) @ v.double()
    out = softmax_attention(q, k, v)
    assert torch.allclose(out.double(), ref, atol=1e-5)
