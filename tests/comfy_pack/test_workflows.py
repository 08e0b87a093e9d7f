"""The pack's shipped example workflows, checked against the real ComfyUI.

- every workflow is a well-formed graph of ComfyUI's own node definitions (types, sockets, links, widget
  counts) and passes ``execution.validate_prompt`` once the model files it names exist (small placeholder
  files in temp model folders), and fails it, naming the file, while one is missing;
- the pack's tiny nodes (Flux2TTRTinyTextEncode, Flux2TTRTinyDecode) give exactly the pipeline's tiny
  teacher conditioning and decoded images;
- the tiny workflow (on the seeded teacher) and the trained one (on the shipped trained teacher, as its
  ``teacher`` stage writes it) run end to end as shipped, on CPU, after a real ``flux2ttr comfy-install --no-pip`` into
  a temp copy of the ComfyUI tree: a fresh ComfyUI process started from that copy (its own models folder,
  nothing registered by hand) loads the installed pack, opens the workflow from the pack's
  example_workflows and writes a PNG that is not blank, with the student layers used; the trained
  teacher's image passes the caption checker for the workflow's caption.

Run as a script (``python test_workflows.py '<json>'``), this file is that ComfyUI process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flux2ttr.teachers.sampler import SamplerConfig

HERE = Path(__file__).resolve()
TESTS = HERE.parents[1]
REPO = HERE.parents[2]
WORKFLOWS = REPO / "comfy_nodes" / "example_workflows"
DEV, KLEIN, TINY = "flux2ttr_controller.json", "flux2ttr_flux2_klein.json", "flux2ttr_tiny_cpu.json"
TRAINED = "flux2ttr_trained_cpu.json"
ALL = [DEV, KLEIN, TINY, TRAINED]
CHILD_TIMEOUT_S = 300

# loader node -> (widget input naming a model file, the ComfyUI model folder it is read from)
MODEL_INPUTS = {
    "UNETLoader": [("unet_name", "diffusion_models")],
    "CLIPLoader": [("clip_name", "text_encoders")],
    "VAELoader": [("vae_name", "vae")],
    "Flux2TTRController": [("student_artifact", "approximate_attention"),
                           ("controller_artifact", "approximate_attention")],
    "Flux2TTRTinyTextEncode": [("codec", "flux2ttr_tiny")],
    "Flux2TTRTinyDecode": [("codec", "flux2ttr_tiny")],
}
# what each workflow must name: ComfyUI's own file names for FLUX.2 dev and Klein 4B (Comfy-Org's repackaged
# files, as ComfyUI's FLUX.2 templates load them), and what comfy-install puts in place for the tiny one
EXPECTED_FILES = {
    DEV: {("diffusion_models", "flux2_dev_fp8mixed.safetensors"),
          ("text_encoders", "mistral_3_small_flux2_bf16.safetensors"), ("vae", "flux2-vae.safetensors"),
          ("approximate_attention", "flux2_ttr.safetensors"),
          ("approximate_attention", "flux2_ttr_controller.safetensors")},
    KLEIN: {("diffusion_models", "flux-2-klein-4b.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
            ("vae", "flux2-vae.safetensors"), ("approximate_attention", "flux2_ttr.safetensors"),
            ("approximate_attention", "flux2_ttr_controller.safetensors")},
    TINY: {("diffusion_models", "flux2_tiny.safetensors"), ("flux2ttr_tiny", "tiny_codec.safetensors"),
           ("approximate_attention", "flux2_ttr.safetensors"),
           ("approximate_attention", "flux2_ttr_controller.safetensors")},
}
EXPECTED_FILES[TRAINED] = EXPECTED_FILES[TINY]  # the trained teacher's stage writes the same file names
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def by_type(ui: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for n in ui["nodes"]:
        out.setdefault(n["type"], []).append(n)
    return out


def model_files(comfy, prompt: dict) -> set[tuple[str, str]]:
    """(folder, file) of every model file an API-format prompt names."""
    files = set()
    for node in prompt.values():
        for name, folder in MODEL_INPUTS.get(node["class_type"], []):
            value = node["inputs"].get(name)
            if value is not None and value != "none":
                files.add((folder, value))
    return files


@contextlib.contextmanager
def model_folders(comfy, tmp_path: Path, files: set[tuple[str, str]]):
    """Placeholder files for ``files`` in temp folders registered with ComfyUI (as extra_model_paths.yaml
    would), removed again afterwards so other tests see the folders as they were."""
    fp = comfy.folder_paths
    added = []
    for folder, name in files:
        d = tmp_path / "placeholder_models" / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"placeholder: only its name matters to validation")
        if str(d) not in fp.get_folder_paths(folder):
            fp.add_model_folder_path(folder, str(d))
            added.append((folder, str(d)))
    try:
        yield
    finally:
        for folder, d in added:
            fp.folder_names_and_paths[folder][0].remove(d)
            fp.filename_list_cache.pop(folder, None)


def validate(comfy, prompt: dict) -> tuple[bool, dict, dict]:
    valid, error, _outputs, node_errors = asyncio.run(
        comfy.modules["execution"].validate_prompt(str(uuid.uuid4()), prompt, None))
    return valid, error, node_errors


# --------------------------------------------------------------------------------------------------
# the graphs


def test_the_pack_ships_four_workflows():
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_graph_matches_comfyui_node_definitions(comfy, name):
    """Every node is a ComfyUI (or pack) node; every link joins an output to an input of the same type at
    the slots ComfyUI defines; every required input is linked or has a widget value; widget values are as
    many as the node's widgets (a seed widget has its control value after it)."""
    ui = load(name)
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    for node in nodes.values():
        assert node["type"] in mappings, f"{name}: {node['type']} is not a node of this ComfyUI + pack"
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out_cls, in_cls = mappings[nodes[src]["type"]], mappings[nodes[dst]["type"]]
        assert out_cls.RETURN_TYPES[src_slot] == typ
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        socket = nodes[dst]["inputs"][dst_slot]
        assert socket["link"] == lid and socket["type"] == typ
        spec = {**in_cls.INPUT_TYPES().get("required", {}), **in_cls.INPUT_TYPES().get("optional", {})}
        assert spec[socket["name"]][0] == typ, f"{name}: link {lid} into {nodes[dst]['type']}.{socket['name']}"
    linked = {(n["id"], i["name"]) for n in nodes.values() for i in n["inputs"] if i.get("link") is not None}
    for node in nodes.values():
        types = mappings[node["type"]].INPUT_TYPES()
        widgets = 0
        for section in ("required", "optional"):
            for input_name, spec in types.get(section, {}).items():
                kind = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if isinstance(kind, list) or kind in WIDGET_TYPES:
                    widgets += 1 + bool(opts.get("control_after_generate"))
                elif section == "required":
                    assert (node["id"], input_name) in linked, f"{name}: {node['type']}.{input_name} is not linked"
        assert len(node["widgets_values"]) == widgets, f"{name}: {node['type']} widget values"


@pytest.mark.parametrize("name", ALL)
def test_model_file_names(comfy, name):
    """The files each workflow loads, by ComfyUI folder: dev and Klein as ComfyUI's own FLUX.2 templates name
    them, the tiny one what comfy-install installs; the controller sits between the model and the sampler."""
    from helpers.comfy import ui_to_api

    prompt = ui_to_api(comfy, load(name))
    assert model_files(comfy, prompt) == EXPECTED_FILES[name]
    ids = {n["class_type"]: nid for nid, n in prompt.items()}
    assert prompt[ids["Flux2TTRController"]]["inputs"]["model"] == [ids["UNETLoader"], 0]
    assert prompt[ids["KSampler"]]["inputs"]["model"] == [ids["Flux2TTRController"], 0]
    if "CLIPLoader" in ids:
        assert prompt[ids["CLIPLoader"]]["inputs"]["type"] == "flux2"


def test_each_model_keeps_its_own_settings(comfy):
    from helpers.comfy import ui_to_api

    def settings(name):
        prompt = ui_to_api(comfy, load(name))
        types = {n["class_type"]: n["inputs"] for n in prompt.values()}
        return types, types["KSampler"], types["EmptyFlux2LatentImage"]

    types, ks, lat = settings(DEV)  # FLUX.2 dev: guidance-distilled, guidance 4 through FluxGuidance, cfg 1
    assert types["FluxGuidance"]["guidance"] == 4.0 and ks["cfg"] == 1.0 and ks["steps"] == 20
    assert (lat["width"], lat["height"]) == (1024, 1024)
    types, ks, lat = settings(KLEIN)  # Klein 4B distilled: 4 steps, cfg 1, no guidance embedding
    assert "FluxGuidance" not in types and ks["cfg"] == 1.0 and ks["steps"] == 4
    assert (lat["width"], lat["height"]) == (1024, 1024)
    pipe = SamplerConfig()  # the pipeline's own settings (256 px, 6 steps, guidance 2, cfg 1)
    from flux2ttr.comfy import tiny_nodes

    assert tiny_nodes.DEFAULT_GUIDANCE == pipe.guidance  # the text-encode node's default (a literal: no tqdm there)
    for name in (TINY, TRAINED):
        types, ks, lat = settings(name)
        assert types["Flux2TTRTinyTextEncode"]["guidance"] == pipe.guidance and ks["cfg"] == pipe.cfg == 1.0
        assert ks["steps"] == pipe.steps and (lat["width"], lat["height"]) == (pipe.width, pipe.height)
        assert types["Flux2TTRController"]["policy_mode"] == "threshold"
        assert {"SaveImage", "Flux2TTRTinyDecode"} <= set(types) and "CLIPLoader" not in types
    # the trained teacher's prompt is a caption of its scene grammar: every word in its vocabulary
    from flux2ttr.teachers import scenes

    caption = settings(TRAINED)[0]["Flux2TTRTinyTextEncode"]["text"]
    words = caption.replace(",", " ").split()
    assert words and set(words) <= set(scenes.vocabulary())


@pytest.mark.parametrize("name", ALL)
def test_validates_in_comfyui_once_its_files_are_there(comfy, name, tmp_path):
    from helpers.comfy import ui_to_api

    prompt = ui_to_api(comfy, load(name))
    files = model_files(comfy, prompt)
    with model_folders(comfy, tmp_path, files):
        valid, error, node_errors = validate(comfy, prompt)
        assert valid, (error, node_errors)
    # the files matter: without the student artifact ComfyUI refuses the prompt and names it
    missing = ("approximate_attention", "flux2_ttr.safetensors")
    with model_folders(comfy, tmp_path / "partial", files - {missing}):
        valid, error, node_errors = validate(comfy, prompt)
    assert not valid
    assert missing[1] in json.dumps(node_errors) and "student_artifact" in json.dumps(node_errors)


# --------------------------------------------------------------------------------------------------
# the tiny nodes


@pytest.fixture(scope="module")
def codec(comfy, tiny_teacher):
    """The tiny teacher's codec registered in the session ComfyUI's models/flux2ttr_tiny."""
    from flux2ttr.comfy import tiny_nodes

    return comfy.add_model_file(tiny_nodes.CODEC_FOLDER, tiny_teacher.folder / tiny_nodes.CODEC_FILE)


def test_tiny_text_encode_is_the_pipeline_conditioning(comfy, tiny_teacher, codec):
    import torch
    from safetensors.torch import load_file

    from flux2ttr.teachers.teacher import TinyPromptEncoder
    from helpers.comfy import TEST_CAPTURE_NODE

    text = "a red fox sleeping in fresh snow at dawn"
    prompt = {
        "1": {"class_type": "Flux2TTRTinyTextEncode", "inputs": {"codec": codec, "text": text, "guidance": 3.5}},
        "2": {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "cond", "value": ["1", 0]}},
    }
    res = comfy.run(prompt)
    assert res.success, res.error()
    [[cond, extra]] = res.captured["cond"][0]
    t = load_file(str(tiny_teacher.folder / codec))
    want = TinyPromptEncoder(t["prompt_encoder.token"], t["prompt_encoder.position"])([text])
    assert cond.shape == (1, 512, tiny_teacher.config.joint_attention_dim) and torch.equal(cond, want)
    assert extra == {"guidance": 3.5}
    assert cond[0, :-9].abs().sum() == 0 and cond[0, -9:].abs().min() > 0  # 9 tokens, zeros before (left pad)


def test_tiny_decode_is_the_pipeline_decoder(comfy, tiny_teacher, codec):
    import torch
    from safetensors.torch import load_file

    from flux2ttr.teachers.teacher import TinyDecoder
    from helpers.comfy import TEST_CAPTURE_NODE

    prompt = {
        "1": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
        "2": {"class_type": "Flux2TTRTinyDecode", "inputs": {"samples": ["1", 0], "codec": codec}},
        "3": {"class_type": TEST_CAPTURE_NODE, "inputs": {"key": "image", "value": ["2", 0]}},
    }
    res = comfy.run(prompt)
    assert res.success, res.error()
    image = res.captured["image"][0]
    assert image.shape == (2, 48, 64, 3) and image.dtype == torch.float32  # ComfyUI IMAGE: [B, H, W, C]
    t = load_file(str(tiny_teacher.folder / codec))
    want = TinyDecoder(t["decoder.weight"], t["decoder.bias"])(torch.zeros(2, 3 * 4, 128), 3, 4)
    assert torch.allclose(image, want.permute(0, 2, 3, 1))
    from flux2ttr.comfy import tiny_nodes

    codec_obj = tiny_nodes.load_codec(tiny_teacher.folder / codec)
    lat = torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(0))
    tokens = lat.flatten(2).transpose(1, 2)  # row-major latent tokens, as the pipeline's sampler holds them
    assert torch.allclose(tiny_nodes.decode(codec_obj, lat), codec_obj.decoder(tokens, 2, 3).permute(0, 2, 3, 1))


def test_tiny_node_errors_name_the_fix(comfy, tiny_teacher, codec, tmp_path):
    import torch

    from flux2ttr.comfy import tiny_nodes

    bad = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "2": {"class_type": "Flux2TTRTinyDecode", "inputs": {"samples": ["1", 0], "codec": codec}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bad"}}}
    res = comfy.run(bad, outputs=["3"])
    assert not res.success and "4 channels" in res.error() and "128" in res.error()
    with pytest.raises(tiny_nodes.TinyCodecError, match="comfy-install"):
        tiny_nodes.load_codec(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(tiny_nodes.TinyCodecError, match="cannot be read as safetensors"):
        tiny_nodes.load_codec(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"decoder.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(tiny_nodes.TinyCodecError, match="not a tiny codec file"):
        tiny_nodes.load_codec(tmp_path / "other.safetensors")
    codec_obj = tiny_nodes.load_codec(tiny_teacher.folder / codec)
    with pytest.raises(tiny_nodes.TinyCodecError, match="guidance"):
        tiny_nodes.encode(codec_obj, "x", float("nan"))


# --------------------------------------------------------------------------------------------------
# the tiny workflow, end to end after comfy-install


def copy_comfyui(src: Path, dst: Path) -> Path:
    """The ComfyUI tree's code as a user's checkout would hold it, without models, custom nodes or outputs."""
    top = {"custom_nodes", "models", "output", "input", "user", "temp"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        return skip | (top & set(names) if Path(folder) == src else set())

    shutil.copytree(src, dst, ignore=ignore)
    return dst


def write_artifacts(folder: Path, teacher) -> None:
    """Students for the tiny teacher's single blocks (all ready) and a controller trained for them that
    routes some layers to their students at quality_speed 0.5 (threshold) and keeps others native."""
    import torch

    from flux2ttr.contract import layer_sort_key
    from flux2ttr.routing.controller import ControllerConfig, TTRController, save_controller
    from flux2ttr.students.artifacts import file_sha256, save_students
    from flux2ttr.students.build import build_student
    from flux2ttr.students.hkr import HKRConfig

    folder.mkdir(parents=True)
    singles = [k for k in teacher.layer_keys if k.startswith("single_blocks.")]
    cfg = HKRConfig(feature_dim=16, landmark_min=4)
    torch.manual_seed(0)
    layers = {k: build_student(cfg, num_heads=teacher.num_heads) for k in singles}
    save_students(folder / "flux2_ttr.safetensors", layers, cfg, num_heads=teacher.num_heads,
                  ready={k: True for k in singles}, metrics={k: {"val_cos_sim": 0.99} for k in singles},
                  train_config={"test": True}, teacher={"kind": "tiny"})
    order = sorted(layers, key=layer_sort_key)
    ctrl = TTRController(ControllerConfig(), order)
    with torch.no_grad():  # low logit = student: single_blocks.0 and .2 routed, .1 and .3 native
        ctrl.head[-1].bias.copy_(torch.tensor([-3.0 if i % 2 == 0 else 3.0 for i in range(len(order))]))
    save_controller(folder / "flux2_ttr_controller.safetensors", ctrl,
                    student_sha256=file_sha256(folder / "flux2_ttr.safetensors"))


def workflow_caption(ui: dict) -> str:
    """The caption of a tiny workflow's Flux2TTRTinyTextEncode (its first string widget)."""
    [node] = [n for n in ui["nodes"] if n["type"] == "Flux2TTRTinyTextEncode"]
    return next(v for v in node["widgets_values"] if isinstance(v, str) and " " in v)


def trained_teacher(folder: Path):
    """The shipped trained teacher as its ``teacher`` stage writes it (``teacher.kind: trained``) into ``folder``."""
    from flux2ttr.teachers.teacher import TeacherConfig, load_teacher
    from flux2ttr.teachers.trained import write_trained_teacher

    cfg = TeacherConfig(kind="trained", trained_file=str(REPO / TeacherConfig().trained_file), out_dir=str(folder))
    write_trained_teacher(cfg)
    return load_teacher(cfg)


@pytest.mark.parametrize("name", [TINY, TRAINED])
def test_tiny_workflow_runs_after_comfy_install(tiny_teacher, tmp_path, name):
    """No ``comfy`` fixture: the workflow runs in a ComfyUI process of its own, started from the installed copy."""
    from click.testing import CliRunner

    from flux2ttr.cli import main
    from helpers.comfy import PACK_DIR, comfyui_path

    comfy_dir = copy_comfyui(comfyui_path(), tmp_path / "ComfyUI")
    project = tmp_path / "project"
    if name == TRAINED:
        teacher = trained_teacher(project / "teachers" / "tiny")
    else:
        teacher = tiny_teacher
        shutil.copytree(tiny_teacher.folder, project / "teachers" / "tiny")
    write_artifacts(project / "artifacts", teacher)
    res = CliRunner().invoke(main, ["comfy-install", str(comfy_dir), "--artifacts", str(project / "artifacts"),
                                    "--teacher", str(project / "teachers" / "tiny"), "--no-pip"])
    assert res.exit_code == 0, res.output
    models = comfy_dir / "models"
    for folder, file in EXPECTED_FILES[name]:
        assert (models / folder / file).is_file(), f"comfy-install did not put {file} into models/{folder}"
    assert (comfy_dir / "custom_nodes" / "flux2ttr").resolve() == PACK_DIR.resolve()

    env = {**os.environ, "COMFYUI_PATH": str(comfy_dir)}
    child = subprocess.run([sys.executable, str(HERE), json.dumps({"comfyui": str(comfy_dir), "workflow": name})],
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=tmp_path)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, child.stdout[-3000:] + child.stderr[-6000:]
    out = json.loads(lines[-1])
    assert out["success"], out["error"]
    [png] = out["images"]
    assert Path(png).parent == comfy_dir / "output"

    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (256, 256, 3)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 1000  # not blank, not flat
    routed = {(step, key) for step, key, route, n in out["routed_calls"] if route == "student" and n > 0}
    native = {(step, key) for step, key, route, n in out["routed_calls"] if route == "native" and n > 0}
    steps = {s for s, _ in routed}
    assert steps == set(range(6)), out["routed_calls"]  # the students ran at every one of the 6 steps
    assert {k for _, k in routed} == {"single_blocks.0", "single_blocks.2"}  # what the controller chose
    assert {"single_blocks.1", "single_blocks.3"} <= {k for _, k in native}
    assert out["guidance"] == pytest.approx(SamplerConfig().guidance)  # the text encoder's guidance reached the model
    if name == TRAINED:  # without the controller, the same graph draws the caption (the test's students are random)
        import torch

        from flux2ttr.teachers import caption_check

        for png_file in out["images"]:
            Path(png_file).unlink()
        child = subprocess.run([sys.executable, str(HERE), json.dumps({"comfyui": str(comfy_dir), "workflow": name,
                                                                       "native": True})],
                               capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=tmp_path)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        assert child.returncode == 0 and lines, child.stdout[-3000:] + child.stderr[-6000:]
        native = json.loads(lines[-1])
        assert native["success"] and not native["routed_calls"], native["error"]
        [png] = native["images"]
        pixels = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy()).permute(2, 0, 1)[None] / 255.0
        caption = workflow_caption(load(name))
        [verdict] = caption_check.check_batch(pixels, [caption])
        assert verdict.strict, verdict  # colour, count, kind and size in the named cell, on the named background
        # and the check can fail: the same image against another caption of the grammar
        [other] = caption_check.check_batch(pixels, ["a large green triangle top right, on beige"])
        assert not other.passed, other


# --------------------------------------------------------------------------------------------------
# the child process: a ComfyUI started from the installed copy


def _child(args: dict) -> dict:
    sys.path.insert(0, str(TESTS))
    from helpers import comfy as harness

    comfy_dir = Path(args["comfyui"])
    comfy = harness.start_comfy(comfy_dir)  # base directory = the copy, so its models/ is what ComfyUI reads
    pack = comfy_dir / "custom_nodes" / "flux2ttr"
    if not harness.load_pack(comfy, pack):
        return {"success": False, "error": f"the installed pack at {pack} did not load"}
    from flux2ttr.comfy import patch as comfy_patch

    ui = json.loads((pack / "example_workflows" / args["workflow"]).read_text())
    prompt = harness.ui_to_api(comfy, ui)  # as shipped: nothing replaced
    if args.get("native"):  # the same graph with the controller taken out: the teacher's own attention
        ids = {n["class_type"]: nid for nid, n in prompt.items()}
        prompt[ids["KSampler"]]["inputs"]["model"] = [ids["UNETLoader"], 0]
        del prompt[ids["Flux2TTRController"]]
    outputs = [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    res = comfy.run(prompt, outputs)
    runs = comfy_patch.last_runs()
    holder = runs[-1] if runs else None
    return {
        "success": res.success, "error": res.error(),
        "images": sorted(str(p) for p in (comfy_dir / "output").rglob("*.png")),
        "routed_calls": [[s, k, r, n] for (s, k, r), n in holder.routed_calls.items()] if holder else [],
        "guidance": holder.call.guidance if holder and holder.call else None,
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
