"""A fixed, exactly invertible linear map between RGB images and FLUX.2 latent tokens (no learned VAE).

FLUX.2 latents have 128 channels per 16x16-pixel token; a 16x16 RGB patch has 768 values, so no linear
map of the full patch is invertible. This one keeps exactly 128 numbers per patch, the way JPEG's
4:2:2 chroma subsampling does:

1. colour: an orthonormal opponent basis, ``Y = (R+G+B)/sqrt(3)``, ``C1 = (R-G)/sqrt(2)``,
   ``C2 = (R+G-2B)/sqrt(6)`` (of pixels - 0.5);
2. resolution: Y averaged over 2x2-pixel blocks (8x8 per patch = 64 values), C1 and C2 over 2-row x 4-column
   blocks (8x4 per patch = 32 values each): 64 + 32 + 32 = 128, each block value scaled by sqrt(its pixel
   count) and the three block grids taken to 2-D DCT coefficients, so the 128 coordinates are those of an
   orthonormal basis ``U [768, 128]`` of the patch (:func:`patch_basis`);
3. channels: a signed, row-permuted Hadamard matrix ``Q [128, 128]`` (:func:`channel_mix`) spreads every
   coefficient evenly over all channels (so each latent channel has about the same variance), times
   ``scale`` (data latents ~unit RMS).

``encode(x) = scale * Q^T U^T (x - 0.5)`` per patch; ``decode(z) = 0.5 + U Q z / scale``. Hence
``encode(decode(z)) == z`` for every latent (to fp32 rounding), and ``decode(encode(x)) == x`` for every
image in the map's image space: Y constant on 2x2 blocks, chroma constant on 2x4 blocks. For any other
image ``decode(encode(x)) = project(x)``, its orthogonal projection onto that space (the nearest such image);
the scene set's images are projected once, so the data set is exactly representable. ``decode`` is affine
per token (``pixels = weight @ z + bias``): the same ``decoder.weight [768, 128]`` / ``decoder.bias [768]``
layout as the seeded tiny teacher's codec, read out without its sigmoid (``clamp`` to [0, 1] for display).

Patch layout: a 768-vector is ``[3, 16, 16]`` (channel, row, column) flattened, as
:class:`~flux2ttr.teachers.teacher.TinyDecoder`; tokens are row-major over the ``h x w`` latent grid.
Core dependencies only (torch).
"""

from __future__ import annotations

import math

import torch

PATCH = 16  # pixels per latent token side (FLUX.2: VAE 8x then 2x2 patchify)
CHANNELS = 128  # FLUX.2 latent channels
LUMA_BLOCK = (2, 2)  # rows, cols of pixels averaged per luma value
CHROMA_BLOCK = (2, 4)  # rows, cols per chroma value (4:2:2)
OFFSET = 0.5  # pixels are centred on mid grey before the map
# orthonormal opponent colour basis (rows): luma, red-green, yellow-blue
COLOUR_BASIS = (
    (1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)),
    (1 / math.sqrt(2), -1 / math.sqrt(2), 0.0),
    (1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)),
)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II ``[n, n]`` float64 (row k = frequency k)."""
    i = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (i.view(1, -1) + 0.5) * i.view(-1, 1) / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def patch_basis() -> torch.Tensor:
    """``U [768, 128]`` float64 with orthonormal columns: the 2-D DCT of the 8x8 grid of 2x2 luma blocks (64
    columns, low frequencies first in row-major frequency order), then the 2-D DCTs of the 8x4 grids of 2x4 C1
    and C2 blocks (32 columns each). The DCT turns the strongly correlated block values of a patch into
    nearly uncorrelated coefficients (a flat patch has only its DC ones), so the channel mix below can give
    every latent channel the same share of the signal."""
    cols = []
    for colour, (bh, bw) in ((0, LUMA_BLOCK), (1, CHROMA_BLOCK), (2, CHROMA_BLOCK)):
        vec = torch.tensor(COLOUR_BASIS[colour], dtype=torch.float64)
        gh, gw = PATCH // bh, PATCH // bw
        blocks = torch.zeros(gh * gw, 3 * PATCH * PATCH, dtype=torch.float64)  # one unit vector per block
        for i in range(gh):
            for j in range(gw):
                u = torch.zeros(3, PATCH, PATCH, dtype=torch.float64)
                u[:, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = vec.view(3, 1, 1) / math.sqrt(bh * bw)
                blocks[i * gw + j] = u.reshape(-1)
        dct = torch.kron(dct_matrix(gh), dct_matrix(gw))  # [gh*gw, gh*gw], orthonormal
        cols.append(blocks.t() @ dct.t())  # column f = sum_b dct[f, b] * block_b
    basis = torch.cat(cols, dim=1)
    assert basis.shape == (3 * PATCH * PATCH, CHANNELS)
    return basis


def channel_mix(seed: int) -> torch.Tensor:
    """``Q [128, 128]`` float64 orthogonal with every entry ``+-1/sqrt(128)``: a Sylvester Hadamard matrix with
    seeded column signs and a seeded row order. Each latent channel then holds every coefficient with the same
    weight, so the channels have about equal variance (a dense random orthogonal matrix would leave them
    unequal: its weights on the few high-energy DC coefficients differ by channel)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < CHANNELS:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (CHANNELS,), generator=g).double() * 2 - 1
    order = torch.randperm(CHANNELS, generator=g)
    return h[order] * signs.view(1, -1) / math.sqrt(CHANNELS)


class LatentMap:
    """The map as one affine decoder ``pixels [768] = weight [768, 128] @ z + bias`` per token; its columns are
    orthogonal with norm ``1 / scale``, so the encoder is ``scale^2 * weight^T (pixels - bias)``.

    ``encode(images [B, 3, 16h, 16w]) -> [B, h*w, 128]``, ``decode(latents [B, h*w, 128], h, w) -> [B, 3, 16h,
    16w]`` (unclamped; ``clamp=True`` for display), ``project(images)`` = decode(encode(images)).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if tuple(weight.shape) != (3 * PATCH * PATCH, CHANNELS) or tuple(bias.shape) != (3 * PATCH * PATCH,):
            raise ValueError(f"latent map weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must be "
                             f"[{3 * PATCH * PATCH}, {CHANNELS}] and [{3 * PATCH * PATCH}]")
        self.weight, self.bias = weight.float().contiguous(), bias.float().contiguous()
        norms2 = weight.double().pow(2).sum(dim=0)
        self.scale = float(1.0 / norms2.mean().sqrt())
        # the encoder in float64 then fp32: scale^2 W^T
        self.enc_weight = (weight.double().t() * (self.scale**2)).float().contiguous()

    @classmethod
    def build(cls, seed: int = 0, scale: float = 1.25) -> LatentMap:
        """The map of ``seed`` (channel mix) and ``scale`` (latent units per pixel-space unit)."""
        weight = patch_basis() @ channel_mix(seed) / scale
        return cls(weight.float(), torch.full((3 * PATCH * PATCH,), OFFSET))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The codec tensors ``decoder.weight`` / ``decoder.bias`` (fp32)."""
        return {"decoder.weight": self.weight.clone(), "decoder.bias": self.bias.clone()}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (H, W multiples of 16) -> latent tokens ``[B, (H/16)*(W/16), 128]`` fp32."""
        B, C, H, W = images.shape
        if C != 3 or H % PATCH or W % PATCH:
            raise ValueError(f"images {tuple(images.shape)}: need [B, 3, H, W] with H, W multiples of {PATCH}")
        h, w = H // PATCH, W // PATCH
        x = images.float().reshape(B, 3, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
        return torch.nn.functional.linear(x - self.bias.to(x.device), self.enc_weight.to(x.device))

    def decode(self, latents: torch.Tensor, height: int, width: int, clamp: bool = False) -> torch.Tensor:
        """``[B, h*w, 128]`` -> images ``[B, 3, 16h, 16w]`` fp32 (``height``/``width`` in latent tokens)."""
        B = latents.shape[0]
        x = torch.nn.functional.linear(latents.float(), self.weight.to(latents.device), self.bias.to(latents.device))
        x = x.view(B, height, width, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, height * PATCH,
                                                                                        width * PATCH)
        return x.clamp(0.0, 1.0) if clamp else x

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """The nearest image the map represents exactly (``decode(encode(images))``), unclamped."""
        _, _, H, W = images.shape
        return self.decode(self.encode(images), H // PATCH, W // PATCH)

    def __call__(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The teacher decoder interface: latents -> images in [0, 1] (clamped for display)."""
        return self.decode(latents, height, width, clamp=True)
