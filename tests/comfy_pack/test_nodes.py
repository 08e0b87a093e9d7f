"""The pack inside the real ComfyUI: loader registration and the four utility nodes run through
``execution.PromptExecutor`` (exact outputs, clear errors)."""

from __future__ import annotations

import json

import pytest

from helpers.comfy import TEST_CAPTURE_NODE

PACK_NODES = {
    "Flux2TTRController": "Flux2 TTR Controller",
    "RandomSeedBatch": "Random Seed Batch",
    "LoadPromptListFromJSON": "Load Prompt List From JSON",
    "ClockedSweepValues": "Clocked Sweep Values",
    "Combinations": "Combinations",
}


def capture(src: str, slot: int = 0, key: str = "value") -> dict:
    return {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": key, "value": [src, slot]}}


def test_loader_registers_all_five_nodes_with_display_names(comfy):
    nodes = comfy.nodes
    for node_id, display in PACK_NODES.items():
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
    # the V3 entrypoint registered the nodes as V3 classes from the pack's module
    assert nodes.NODE_CLASS_MAPPINGS["Flux2TTRController"].__module__.endswith("nodes")
    # the pack registered its model folder, and it exists
    folder = comfy.folder_paths.get_folder_paths("approximate_attention")
    assert any(p.startswith(str(comfy.base)) for p in folder)
    assert (comfy.base / "models" / "approximate_attention").is_dir()


def test_model_folder_keeps_paths_from_extra_model_paths(comfy, tmp_path):
    import importlib

    pack_nodes = importlib.import_module(comfy.nodes.NODE_CLASS_MAPPINGS["Flux2TTRController"].__module__)
    fp = comfy.folder_paths
    extra = tmp_path / "shared_artifacts"
    extra.mkdir()
    (extra / "from_yaml.safetensors").write_bytes(b"x")
    fp.add_model_folder_path("approximate_attention", str(extra))  # what extra_model_paths.yaml does
    try:
        pack_nodes.register_model_folder()
        paths = fp.get_folder_paths("approximate_attention")
        assert str(extra) in paths and str(comfy.base / "models" / "approximate_attention") in paths
        # the node's dropdown offers files from every registered path
        kind, spec = comfy.nodes.NODE_CLASS_MAPPINGS["Flux2TTRController"].INPUT_TYPES()["required"]["student_artifact"]
        assert kind == "COMBO" and "from_yaml.safetensors" in spec["options"]
    finally:
        fp.folder_names_and_paths["approximate_attention"][0].remove(str(extra))


def test_random_seed_batch_is_splitmix64(comfy):
    prompt = {"1": {"class_type": "RandomSeedBatch", "inputs": {"base_seed": 0, "count": 3}}, "2": capture("1")}
    res = comfy.run(prompt)
    assert res.success, res.error()
    # SplitMix64 reference outputs for state 0 (the published test vector of the generator)
    assert res.captured["value"] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    # deterministic; another base seed gives another list; count respected
    res2 = comfy.run({"1": {"class_type": "RandomSeedBatch", "inputs": {"base_seed": 1234, "count": 5}},
                      "2": capture("1")})
    again = comfy.run({"1": {"class_type": "RandomSeedBatch", "inputs": {"base_seed": 1234, "count": 5}},
                       "2": capture("1")})
    assert res2.captured["value"] == again.captured["value"]
    assert len(set(res2.captured["value"])) == 5 and res2.captured["value"][:3] != res.captured["value"]


def test_random_seed_batch_bad_count(comfy):
    res = comfy.run({"1": {"class_type": "RandomSeedBatch", "inputs": {"base_seed": 0, "count": 0}},
                     "2": capture("1")})
    assert not res.success
    # ComfyUI's own validation (min=1) or the node's check: either way the run fails naming count
    assert "count" in json.dumps(res.status_messages, default=str)


def test_load_prompt_list(comfy, tmp_path):
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps(["a red fox", "ein Haus am See", "  spaced  "]))
    res = comfy.run({"1": {"class_type": "LoadPromptListFromJSON", "inputs": {"json_path": str(good)}},
                     "2": capture("1")})
    assert res.success, res.error()
    assert res.captured["value"] == ["a red fox", "ein Haus am See", "  spaced  "]
    # relative paths resolve against ComfyUI's input folder
    (comfy.base / "input" / "rel.json").write_text('["one"]')
    res = comfy.run({"1": {"class_type": "LoadPromptListFromJSON", "inputs": {"json_path": "rel.json"}},
                     "2": capture("1")})
    assert res.success, res.error()
    assert res.captured["value"] == ["one"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}', "must hold a JSON array"),
        ('["ok", 3]', "item 1 is a int"),
        ("[]", "empty array"),
        ('["a",]', "not valid UTF-8 JSON"),
        ('["a", ""]', "item 1 is an empty string"),
        (None, "not found"),
    ],
)
def test_load_prompt_list_errors(comfy, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    res = comfy.run({"1": {"class_type": "LoadPromptListFromJSON", "inputs": {"json_path": str(path)}},
                     "2": capture("1")})
    assert not res.success
    assert message in res.error() and "LoadPromptListFromJSON" in res.error()


@pytest.mark.parametrize(
    "clock, values, expected",
    [
        ("100", "1, 2, 3", [1.0] * 33 + [2.0] * 33 + [3.0] * 34),
        ("[0.5, 0.25, 9, 9, 9]", "[10, 20]", [10.0, 10.0, 20.0, 20.0, 20.0]),
        ("", "0.1 0.2 0.3", [0.1, 0.2, 0.3]),
        ("4", "7", [7.0] * 4),
        ("1 2 3 4 5 6", "-1, 1, 3", [-1.0, -1.0, 1.0, 1.0, 3.0, 3.0]),
    ],
)
def test_clocked_sweep_values(comfy, clock, values, expected):
    res = comfy.run({"1": {"class_type": "ClockedSweepValues", "inputs": {"clock": clock, "values": values}},
                     "2": capture("1")})
    assert res.success, res.error()
    assert res.captured["value"] == expected


@pytest.mark.parametrize(
    "clock, values, message",
    [("2", "1, 2, 3", "fewer than the 3 values"), ("5", "", "values is empty"), ("1 x 3", "1", "not a number"),
     ("0", "1", "at least 1"), ("3", "1, nan", "not finite")],
)
def test_clocked_sweep_errors(comfy, clock, values, message):
    res = comfy.run({"1": {"class_type": "ClockedSweepValues", "inputs": {"clock": clock, "values": values}},
                     "2": capture("1")})
    assert not res.success
    assert message in res.error() and "ClockedSweepValues" in res.error()


def test_combinations_cover_the_cartesian_product(comfy):
    prompt = {
        "1": {"class_type": "Combinations", "inputs": {"A": "1, 2, 3", "B": "[4, 5]", "C": "", "D": "0.5 0.25"}},
        "2": capture("1", 0, "A"), "3": capture("1", 1, "B"), "4": capture("1", 2, "C"), "5": capture("1", 3, "D"),
    }
    res = comfy.run(prompt)
    assert res.success, res.error()
    a, b, c, d = (res.captured[k] for k in "ABCD")
    assert a == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    assert b == [4.0, 4.0, 5.0, 5.0] * 3
    assert d == [0.5, 0.25] * 6
    assert sorted(zip(a, b, d)) == sorted((x, y, z) for x in (1.0, 2.0, 3.0) for y in (4.0, 5.0) for z in (0.5, 0.25))
    assert c == []  # an unused list takes no part and gives an empty output


def test_combinations_two_by_two_covers_all(comfy):
    # the case a plain cyclic repeat would get wrong: 2 x 2 lists need 4 distinct pairs
    prompt = {"1": {"class_type": "Combinations", "inputs": {"A": "1 2", "B": "3 4"}},
              "2": capture("1", 0, "A"), "3": capture("1", 1, "B")}
    res = comfy.run(prompt)
    assert res.success, res.error()
    assert list(zip(res.captured["A"], res.captured["B"])) == [(1.0, 3.0), (1.0, 4.0), (2.0, 3.0), (2.0, 4.0)]


@pytest.mark.parametrize("inputs, message", [({"A": ""}, "all lists are empty"), ({"A": "1", "B": "[1, true]"}, "boolean"),
                                             ({"A": "[1, 2"}, "not a valid JSON array")])
def test_combinations_errors(comfy, inputs, message):
    res = comfy.run({"1": {"class_type": "Combinations", "inputs": inputs}, "2": capture("1")})
    assert not res.success
    assert message in res.error() and "Combinations" in res.error()
