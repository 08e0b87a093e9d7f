"""The latent map: orthonormal parts, encode(decode(z)) == z for every latent, decode(encode(x)) == x for
every scene image (after its one projection), about unit-RMS latents with equal channels, and the seeded
tiny teacher's decoder layout."""

from __future__ import annotations

import math

import pytest
import torch

from flux2ttr.teachers import latent_map as lm
from flux2ttr.teachers import scenes as sc
from flux2ttr.teachers.teacher import TinyDecoder

EXACT = 1e-5  # fp32 rounding of a 128-term dot product on values ~1


@pytest.fixture(scope="module")
def lmap() -> lm.LatentMap:
    cfg = sc.SceneConfig()
    return lm.LatentMap.build(cfg.latent_seed, cfg.latent_scale)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    cfg = sc.SceneConfig()
    drawn = [sc.training_scene(cfg, i) for i in range(48)] + sc.held_out_scenes(cfg, 16)
    return sc.render(drawn, 256, 256)


def test_parts_are_orthonormal():
    u = lm.patch_basis()
    torch.testing.assert_close(u.t() @ u, torch.eye(128, dtype=torch.float64), atol=1e-12, rtol=0)
    q = lm.channel_mix(0)
    torch.testing.assert_close(q.t() @ q, torch.eye(128, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(128)))  # every coefficient in every channel
    assert not torch.equal(q, lm.channel_mix(1))
    d = lm.dct_matrix(8)
    torch.testing.assert_close(d @ d.t(), torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_encode_decode_is_the_identity_on_latents(lmap):
    z = torch.randn(3, 16 * 16, 128, generator=torch.Generator().manual_seed(0)) * 2
    back = lmap.encode(lmap.decode(z, 16, 16))
    assert float((back - z).abs().max()) < EXACT * 2


def test_decode_encode_is_the_identity_on_scene_images(lmap, images):
    projected = lmap.project(images)
    # the raw drawing is not in the map's image space (its 2x4 chroma / 2x2 luma blocks are not constant) ...
    assert float((projected - images).abs().max()) > 1e-2
    # ... its projection is, exactly: the data set the teacher learns is what the latents represent
    again = lmap.project(projected)
    assert float((again - projected).abs().max()) < EXACT
    z = lmap.encode(projected)
    assert float((lmap.encode(lmap.decode(z, 16, 16)) - z).abs().max()) < EXACT * 2
    # the projection is orthogonal: the residual is orthogonal to the image space
    resid = (images - projected).double()
    assert float(lmap.encode(resid.float() + 0.5).abs().max()) < 1e-4
    # and small: a display image loses only chroma/luma detail inside its blocks
    assert float((projected - images).abs().mean()) < 0.005


def test_non_square_and_other_sizes(lmap):
    x = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    z = lmap.encode(x)
    assert z.shape == (2, 4 * 8, 128)
    p = lmap.decode(z, 4, 8)
    assert p.shape == x.shape
    assert float((lmap.project(p) - p).abs().max()) < EXACT
    assert lmap(z, 4, 8).min() >= 0 and lmap(z, 4, 8).max() <= 1  # the teacher decoder clamps for display
    with pytest.raises(ValueError, match="multiples of 16"):
        lmap.encode(torch.zeros(1, 3, 24, 32))


def test_scene_latents_have_unit_scale_and_equal_channels(lmap, images):
    z = lmap.encode(images)
    rms = z.pow(2).mean(dim=(0, 1)).sqrt()  # per channel
    assert 0.85 < float(z.pow(2).mean().sqrt()) < 1.2
    assert float(rms.max() / rms.min()) < 1.5  # the Hadamard mix spreads the DC energy evenly
    assert lmap.scale == pytest.approx(sc.SceneConfig().latent_scale, rel=1e-6)


def test_the_seeded_teachers_decoder_layout(lmap):
    """The map is an affine decoder in the codec layout of the seeded teacher (decoder.weight [768, 128]):
    TinyDecoder with the same tensors gives sigmoid of this map's pixels."""
    z = torch.randn(1, 4 * 4, 128, generator=torch.Generator().manual_seed(2)) * 0.3
    tiny = TinyDecoder(lmap.tensors()["decoder.weight"], lmap.tensors()["decoder.bias"])
    torch.testing.assert_close(tiny(z, 4, 4), torch.sigmoid(lmap.decode(z, 4, 4)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="latent map weight"):
        lm.LatentMap(torch.zeros(10, 128), torch.zeros(10))
