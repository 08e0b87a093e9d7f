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


def _load_prompts(comfy, json_path: str):
    return comfy.run({"1": {"class_type": "LoadPromptListFromJSON", "inputs": {"json_path": json_path}},
                      "2": capture("1")})


def test_load_prompt_list(comfy):
    inp = comfy.base / "input"
    (inp / "prompts.json").write_text(json.dumps(["a red fox", "ein Haus am See", "  spaced  "]))
    res = _load_prompts(comfy, "prompts.json")  # relative paths resolve against ComfyUI's input folder
    assert res.success, res.error()
    assert res.captured["value"] == ["a red fox", "ein Haus am See", "  spaced  "]
    # a subfolder, a harmless .. that stays inside, and an absolute path inside the input folder all load
    (inp / "lists").mkdir(exist_ok=True)
    (inp / "lists" / "one.json").write_text('["one"]')
    for json_path in ("lists/one.json", "lists/../lists/one.json", str(inp / "lists" / "one.json")):
        res = _load_prompts(comfy, json_path)
        assert res.success, (json_path, res.error())
        assert res.captured["value"] == ["one"]


SECRET = "sk-flux2ttr-test-0123456789"


def _assert_refused_without_content(res, *, needle: str) -> None:
    assert not res.success
    err = res.error()
    assert "LoadPromptListFromJSON" in err and needle in err, err
    everything = json.dumps(res.status_messages, default=str)  # message, traceback, inputs: all of it
    assert SECRET not in everything and "api_key" not in everything, everything


def test_load_prompt_list_refuses_paths_outside_the_input_folder(comfy, tmp_path):
    inp = comfy.base / "input"
    secret = {"api_key": SECRET}
    # next to the input folder: reached through ../
    (comfy.base / "secret.json").write_text(json.dumps([secret]))
    for json_path in ("../secret.json", "lists/../../secret.json", "./../secret.json"):
        res = _load_prompts(comfy, json_path)
        _assert_refused_without_content(res, needle="outside ComfyUI's input folder")
        assert str(inp.resolve()) in res.error()  # says where files must be
    # an absolute path elsewhere on the machine
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(["fine", secret]))
    res = _load_prompts(comfy, str(outside))
    _assert_refused_without_content(res, needle="outside ComfyUI's input folder")
    assert str(inp.resolve()) in res.error()
    # a missing file outside is refused the same way (no probing for files elsewhere)
    res = _load_prompts(comfy, str(tmp_path / "does_not_exist.json"))
    _assert_refused_without_content(res, needle="outside ComfyUI's input folder")
    # a symlink inside the input folder that points outside
    link = inp / "link_to_secret.json"
    if not link.is_symlink():
        link.symlink_to(outside)
    res = _load_prompts(comfy, "link_to_secret.json")
    _assert_refused_without_content(res, needle="outside ComfyUI's input folder")


def test_load_prompt_list_errors_never_echo_content(comfy):
    """A file inside the input folder with a non-string item: the error names the index and the type only."""
    (comfy.base / "input" / "with_secret.json").write_text(json.dumps(["ok", {"api_key": SECRET}]))
    res = _load_prompts(comfy, "with_secret.json")
    _assert_refused_without_content(res, needle="item 1 is an object")
    (comfy.base / "input" / "secret_list.json").write_text(json.dumps([SECRET, [SECRET]]))
    res = _load_prompts(comfy, "secret_list.json")
    assert not res.success and "item 1 is an array" in res.error()
    assert SECRET not in json.dumps(res.status_messages, default=str)
    (comfy.base / "input" / "broken.json").write_text('["' + SECRET + '",')
    res = _load_prompts(comfy, "broken.json")
    assert not res.success and "not valid JSON" in res.error()
    assert SECRET not in json.dumps(res.status_messages, default=str)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}', "must hold a JSON array of strings, found an object"),
        ('["ok", 3]', "item 1 is a number"),
        ("[]", "empty array"),
        ('["a",]', "not valid JSON"),
        ('["a", ""]', "item 1 is an empty string"),
        (b"\xff\xfe[]", "not UTF-8 text"),
        (None, "not found"),
    ],
)
def test_load_prompt_list_errors(comfy, content, message):
    name = f"bad_{abs(hash((content, message)))}.json"
    path = comfy.base / "input" / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    res = _load_prompts(comfy, name)
    assert not res.success
    assert message in res.error() and "LoadPromptListFromJSON" in res.error()


def test_load_prompt_list_says_what_it_accepts(comfy):
    schema = comfy.nodes.NODE_CLASS_MAPPINGS["LoadPromptListFromJSON"].GET_SCHEMA()
    assert "input folder" in schema.description
    tooltip = schema.inputs[0].tooltip
    assert "input folder" in tooltip and "absolute" in tooltip


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
