"""The trained teacher's prompt encoder: vocabulary ids, 512 left-padded tokens, the trainable module equal to
the frozen one (the seeded teacher's formula) bit for bit."""

from __future__ import annotations

import pytest
import torch

from flux2ttr.contract import FLUX2_COND_TOKENS
from flux2ttr.teachers.caption_encoder import UNK, CaptionEncoder, CaptionTokenizer, VocabPromptEncoder
from flux2ttr.teachers.scenes import vocabulary

PROMPTS = ["two small red circles top left, a blue stripe across the bottom, on grey", "on black", "",
           "a large purple ring in the center, on a beige gradient", "a zebra, on grey"]


def test_tokenizer():
    tok = CaptionTokenizer(vocabulary())
    assert tok.vocab[0] == UNK and len(tok) == len(vocabulary()) + 1
    ids = tok.ids("Two small RED circles, on grey")
    assert [tok.vocab[i] for i in ids] == ["two", "small", "red", "circles", ",", "on", "grey"]
    assert tok.ids("a zebra")[1] == 0  # unknown word
    batch = tok.batch(["on grey", ""])
    assert batch.shape == (2, FLUX2_COND_TOKENS)
    assert batch[0, -2:].tolist() == tok.ids("on grey") and bool((batch[0, :-2] == -1).all())
    assert bool((batch[1] == -1).all())
    with pytest.raises(ValueError, match="unique"):
        CaptionTokenizer(["a", "a"])


def test_trainable_equals_frozen_encoder():
    enc = CaptionEncoder(vocabulary(), 16, generator=torch.Generator().manual_seed(0))
    out = enc(PROMPTS)
    assert out.shape == (len(PROMPTS), FLUX2_COND_TOKENS, 16)
    t = enc.codec_tensors()
    frozen = VocabPromptEncoder(t["prompt_encoder.token"], t["prompt_encoder.position"], enc.tokenizer.vocab)
    assert torch.equal(out.detach(), frozen(PROMPTS))
    n = len(enc.tokenizer.ids(PROMPTS[0]))
    assert bool((out[0, :-n] == 0).all()) and bool((out[0, -n:] != 0).any())  # zeros first, real tokens last
    assert bool((out[2] == 0).all())  # the empty caption: all padding (the caption-dropout input)
    torch.testing.assert_close(out[1, -1].detach(), t["prompt_encoder.token"][enc.tokenizer.ids("black")[0]]
                               + t["prompt_encoder.position"][1])


def test_gradients_reach_only_used_rows():
    enc = CaptionEncoder(vocabulary(), 8, generator=torch.Generator().manual_seed(1))
    enc(["on grey"]).sum().backward()
    used = set(enc.tokenizer.ids("on grey"))
    rows = {i for i in range(len(enc.tokenizer)) if bool(enc.token.grad[i].abs().sum() > 0)}
    assert rows == used
    assert bool(enc.position.grad[:2].abs().sum() > 0) and bool((enc.position.grad[2:] == 0).all())


def test_vocab_must_match_the_table():
    with pytest.raises(ValueError, match="token table"):
        VocabPromptEncoder(torch.zeros(3, 4), torch.zeros(512, 4), vocabulary())
