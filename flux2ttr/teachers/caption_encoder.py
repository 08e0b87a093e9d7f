"""The trained teacher's prompt encoder: a fixed word vocabulary, a learned token table and a learned
position table, laid out as FLUX.2 conditioning (512 tokens, real ones last, zeros before: ComfyUI's left
padding).

``cond[b, 512 - n + i] = token[ids[i]] + position[i]`` for the ``n`` tokens of prompt ``b``; the rest is zero.
That is the seeded tiny teacher's formula (:class:`~flux2ttr.teachers.teacher.TinyPromptEncoder`, with the same
codec tensors ``prompt_encoder.token [V, ctx]`` and ``prompt_encoder.position [512, ctx]``); only the token ids
differ: an index into the vocabulary instead of a hash. Words are lower-cased word/punctuation tokens; a word
outside the vocabulary maps to id 0, ``<unk>``.

:class:`CaptionEncoder` is the trainable module (training); :class:`VocabPromptEncoder` the frozen one the
teacher and the ComfyUI node use. Core dependencies only (torch).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from flux2ttr.contract import FLUX2_COND_TOKENS
from flux2ttr.teachers.teacher import TinyPromptEncoder

UNK = "<unk>"
_WORD = re.compile(r"\w+|[^\w\s]")  # the seeded tiny teacher's word split


class CaptionTokenizer:
    """Words -> ids over ``vocab`` (``<unk>`` is id 0 and is prepended when missing)."""

    def __init__(self, vocab: list[str], cond_tokens: int = FLUX2_COND_TOKENS) -> None:
        vocab = list(vocab)
        if UNK not in vocab:
            vocab = [UNK] + vocab
        if vocab[0] != UNK or len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary: <unk> must be first and words unique")
        self.vocab, self.cond_tokens = vocab, cond_tokens
        self._ids = {w: i for i, w in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def ids(self, prompt: str) -> list[int]:
        """The prompt's token ids (at most ``cond_tokens``)."""
        return [self._ids.get(w, 0) for w in _WORD.findall(prompt.lower())[: self.cond_tokens]]

    def batch(self, prompts: list[str]) -> torch.Tensor:
        """``[B, cond_tokens]`` long: ids right-aligned, ``-1`` in the padding before them."""
        out = torch.full((len(prompts), self.cond_tokens), -1, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids = self.ids(p)
            if ids:
                out[b, self.cond_tokens - len(ids):] = torch.tensor(ids)
        return out


class CaptionEncoder(nn.Module):
    """Learned token + position embeddings -> ``[B, 512, ctx]`` conditioning (zeros in the padding).

    ``token`` starts at N(0, 1) (the scale of the seeded teacher's table), ``position`` at N(0, 0.1^2)."""

    def __init__(self, vocab: list[str], context_dim: int, cond_tokens: int = FLUX2_COND_TOKENS,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.tokenizer = CaptionTokenizer(vocab, cond_tokens)
        self.token = nn.Parameter(torch.randn(len(self.tokenizer), context_dim, generator=generator))
        self.position = nn.Parameter(0.1 * torch.randn(cond_tokens, context_dim, generator=generator))

    @property
    def cond_tokens(self) -> int:
        return self.tokenizer.cond_tokens

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, 512]`` (``-1`` = padding, real ids right-aligned) -> ``[B, 512, ctx]``."""
        real = ids >= 0
        n = real.sum(dim=1, keepdim=True)  # [B, 1] real tokens per prompt
        slot = torch.arange(ids.shape[1], device=ids.device).view(1, -1)
        pos = (slot - (ids.shape[1] - n)).clamp(min=0)  # position index of a real token: 0 for the first
        # F.embedding, not table[ids]: its backward reduces the repeated padding ids without index_put's atomics
        out = nn.functional.embedding(ids.clamp(min=0), self.token) + nn.functional.embedding(pos, self.position)
        return out * real.unsqueeze(-1).to(out.dtype)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.embed_ids(self.tokenizer.batch(prompts).to(self.token.device))

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        """The codec's ``prompt_encoder.token`` / ``prompt_encoder.position`` (fp32, CPU)."""
        return {"prompt_encoder.token": self.token.detach().float().cpu().contiguous(),
                "prompt_encoder.position": self.position.detach().float().cpu().contiguous()}


class VocabPromptEncoder(TinyPromptEncoder):
    """The frozen encoder: :class:`TinyPromptEncoder`'s formula with vocabulary ids."""

    def __init__(self, token: torch.Tensor, position: torch.Tensor, vocab: list[str],
                 cond_tokens: int = FLUX2_COND_TOKENS) -> None:
        super().__init__(token, position, cond_tokens)
        self.tokenizer = CaptionTokenizer(vocab, cond_tokens)
        if len(self.tokenizer) != token.shape[0]:
            raise ValueError(f"vocabulary of {len(self.tokenizer)} words but a token table of {token.shape[0]} rows")

    def token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.ids(prompt)
