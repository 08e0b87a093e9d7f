"""Prompt files: the shipped lists load; malformed files give errors naming the file and the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux2ttr.teachers.prompts import PromptFileError, load_prompts

REPO = Path(__file__).resolve().parents[2]


def test_shipped_prompt_files_load():
    capture = load_prompts(REPO / "data/prompts/capture.json")
    controller = load_prompts(REPO / "data/prompts/controller.json")
    # enough capture prompts that the held-out fifth gives >= 32 validation tuples per layer, few enough for a CPU
    assert 32 <= len(capture) <= 64 and 4 <= len(controller) <= 6
    assert len(set(capture)) == len(capture)
    assert not set(capture) & set(controller)  # controller prompts are held out from capture


def test_valid_file_round_trip(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('["a red fox", "ein Haus am See \\u00e4"]', encoding="utf-8")
    assert load_prompts(f) == ["a red fox", "ein Haus am See ä"]


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"prompts": ["a"]}', r"top level is a JSON object, expected a JSON array"),
        ('"just a string"', r"top level is a JSON str"),
        ("[]", r"empty"),
        ('["ok", 3, "fine"]', r"entry 1 is 3 \(a JSON number\), expected a string"),
        ('["ok", "fine", null]', r"entry 2 is null \(a JSON null\)"),
        ('["ok", ["nested"]]', r"entry 1 .* JSON array"),
        ('["ok", "   "]', r"entry 1 is an empty string"),
        ('["ok", "missing quote]', r"invalid JSON at line 1"),
    ],
)
def test_bad_files_name_file_and_entry(tmp_path, text, match):
    f = tmp_path / "bad_prompts.json"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match=match) as e:
        load_prompts(f)
    assert str(e.value).startswith(str(f))


def test_missing_and_non_utf8(tmp_path):
    with pytest.raises(PromptFileError, match=r"missing\.json: prompt file not found"):
        load_prompts(tmp_path / "missing.json")
    f = tmp_path / "latin1.json"
    f.write_bytes('["caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(f)
