"""The pack's nodes: schemas only; the work is done by ``flux2ttr.comfy.patch``,
``flux2ttr.comfy.utility_nodes`` and ``flux2ttr.comfy.tiny_nodes``."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

try:
    from flux2ttr.comfy import patch as comfy_patch
    from flux2ttr.comfy import tiny_nodes, utility_nodes
except ImportError as e:  # the pack is installed but the library is not in ComfyUI's Python
    raise ImportError(f"flux2ttr node pack: cannot import the flux2ttr library ({e}); run "
                      "`pip install -e /path/to/flux2ttr` with ComfyUI's Python") from e

FOLDER = "approximate_attention"   # models/approximate_attention: student and controller artifacts
NO_CONTROLLER = "none"


def register_model_folder() -> str:
    """Register ``models/approximate_attention`` (created on demand), keeping paths that
    ``extra_model_paths.yaml`` already added for it."""
    path = os.path.join(folder_paths.models_dir, FOLDER)
    os.makedirs(path, exist_ok=True)
    if FOLDER in folder_paths.folder_names_and_paths:
        if path not in folder_paths.get_folder_paths(FOLDER):
            folder_paths.add_model_folder_path(FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], {".safetensors"})
    return path


def _artifact_files() -> list[str]:
    register_model_folder()
    return folder_paths.get_filename_list(FOLDER)


def _artifact_path(name: str, what: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"Flux2TTRController: {what} '{name}' not found in models/{FOLDER} "
                                f"({folder_paths.get_folder_paths(FOLDER)}); run `flux2ttr comfy-install` "
                                "or copy the artifact there")
    return path


class Flux2TTRController(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = _artifact_files()
        return io.Schema(
            node_id="Flux2TTRController",
            display_name="Flux2 TTR Controller",
            category="advanced/model_patches",
            description="Route FLUX.2 attention layers to distilled flux2ttr students, per step and layer.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("student_artifact", options=files,
                               tooltip=f"student layers (flux2_ttr.safetensors) from models/{FOLDER}"),
                io.Combo.Input("controller_artifact", options=[NO_CONTROLLER] + files, default=NO_CONTROLLER,
                               tooltip="trained controller; 'none' routes every ready layer above the quality_speed cut"),
                io.Float.Input("quality_speed", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = full quality (native attention), 1 = fastest (most students)"),
                io.Combo.Input("policy_mode", options=list(comfy_patch.POLICY_MODES), default="stochastic",
                               tooltip="stochastic: one sampled mask per step; threshold: deterministic cutoff"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, student_artifact: str, controller_artifact: str, quality_speed: float,
                policy_mode: str, seed: int) -> io.NodeOutput:
        student_path = _artifact_path(student_artifact, "student artifact")
        controller_path = None
        if controller_artifact != NO_CONTROLLER:
            controller_path = _artifact_path(controller_artifact, "controller artifact")
        patched = comfy_patch.controller_node(model, student_path, controller_path, quality_speed=quality_speed,
                                              policy_mode=policy_mode, seed=seed)
        return io.NodeOutput(patched)


class RandomSeedBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RandomSeedBatch",
            display_name="Random Seed Batch",
            category="utils/flux2ttr",
            description="A deterministic list of seeds (SplitMix64 of the base seed).",
            inputs=[
                io.Int.Input("base_seed", default=0, min=0, max=utility_nodes.SEED_MAX),
                io.Int.Input("count", default=4, min=1, max=utility_nodes.MAX_SEED_COUNT),
            ],
            outputs=[io.Int.Output("seeds", is_output_list=True)],
        )

    @classmethod
    def execute(cls, base_seed: int, count: int) -> io.NodeOutput:
        return io.NodeOutput(utility_nodes.random_seed_batch(base_seed, count))


class LoadPromptListFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadPromptListFromJSON",
            display_name="Load Prompt List From JSON",
            category="utils/flux2ttr",
            description="Reads a JSON file holding an array of prompt strings from ComfyUI's input folder (only "
                        "there: paths leaving it, through .. or symlinks, and absolute paths elsewhere are refused).",
            inputs=[io.String.Input(
                "json_path", default="prompts.json",
                tooltip="Path of a .json file inside ComfyUI's input folder, relative to it (prompts.json, "
                        "lists/cats.json); an absolute path is accepted only inside that folder. The file must "
                        "hold a JSON array of non-empty strings.")],
            outputs=[io.String.Output("prompts", is_output_list=True)],
        )

    @classmethod
    def execute(cls, json_path: str) -> io.NodeOutput:
        return io.NodeOutput(utility_nodes.load_prompt_list(json_path, folder_paths.get_input_directory()))


class ClockedSweepValues(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ClockedSweepValues",
            display_name="Clocked Sweep Values",
            category="utils/flux2ttr",
            description="One value per clock entry, the values held over equal contiguous segments of the clock.",
            inputs=[
                io.String.Input("clock", default="",
                                tooltip="numbers (JSON array or comma/space separated), or N for 1..N; empty: one per value"),
                io.String.Input("values", default="0.0, 0.5, 1.0", tooltip="values to sweep"),
            ],
            outputs=[io.Float.Output("values", is_output_list=True)],
        )

    @classmethod
    def execute(cls, clock: str, values: str) -> io.NodeOutput:
        return io.NodeOutput(utility_nodes.clocked_sweep(clock, values))


class Combinations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Combinations",
            display_name="Combinations",
            category="utils/flux2ttr",
            description="Float lists that, read position by position, enumerate the Cartesian product of A-D.",
            inputs=[io.String.Input(n, default="1.0" if n == "A" else "", optional=n != "A") for n in "ABCD"],
            outputs=[io.Float.Output(f"{n}_out", is_output_list=True) for n in "ABCD"],
        )

    @classmethod
    def execute(cls, A: str, B: str = "", C: str = "", D: str = "") -> io.NodeOutput:
        return io.NodeOutput(*utility_nodes.combinations(A, B, C, D))


def register_tiny_folder() -> str:
    """Register ``models/flux2ttr_tiny`` (the tiny teacher's codec; created on demand), keeping paths that
    ``extra_model_paths.yaml`` already added for it."""
    name = tiny_nodes.CODEC_FOLDER
    path = os.path.join(folder_paths.models_dir, name)
    os.makedirs(path, exist_ok=True)
    if name in folder_paths.folder_names_and_paths:
        if path not in folder_paths.get_folder_paths(name):
            folder_paths.add_model_folder_path(name, path)
    else:
        folder_paths.folder_names_and_paths[name] = ([path], {".safetensors"})
    return path


def _codec_input() -> io.Combo.Input:
    register_tiny_folder()
    files = folder_paths.get_filename_list(tiny_nodes.CODEC_FOLDER)
    return io.Combo.Input("codec", options=files,
                          default=tiny_nodes.CODEC_FILE if tiny_nodes.CODEC_FILE in files else None,
                          tooltip=f"the tiny teacher's prompt encoder + decoder ({tiny_nodes.CODEC_FILE}) from "
                                  f"models/{tiny_nodes.CODEC_FOLDER}; `flux2ttr comfy-install` puts it there")


def _codec(name: str, node: str) -> tiny_nodes.TinyCodec:
    register_tiny_folder()
    path = folder_paths.get_full_path(tiny_nodes.CODEC_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"{node}: codec '{name}' not found in models/{tiny_nodes.CODEC_FOLDER} "
                                f"({folder_paths.get_folder_paths(tiny_nodes.CODEC_FOLDER)}); run `flux2ttr "
                                f"comfy-install` or copy teachers/tiny/{tiny_nodes.CODEC_FILE} there")
    return tiny_nodes.load_codec(path)


class Flux2TTRTinyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2TTRTinyTextEncode",
            display_name="Flux2 TTR Tiny Text Encode",
            category="advanced/conditioning/flux2ttr",
            description="The tiny FLUX.2 teacher's prompt encoder (flux2_tiny.safetensors has no real text encoder): "
                        "a prompt to CONDITIONING with FLUX.2 guidance, for the tiny teacher only.",
            inputs=[
                _codec_input(),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                default="a red cube on a blue floor, soft light"),
                io.Float.Input("guidance", default=tiny_nodes.DEFAULT_GUIDANCE, min=0.0, max=tiny_nodes.MAX_GUIDANCE,
                               step=0.1, tooltip="FLUX.2 guidance embedding value (what FluxGuidance sets)"),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, codec: str, text: str, guidance: float) -> io.NodeOutput:
        return io.NodeOutput(tiny_nodes.encode(_codec(codec, "Flux2TTRTinyTextEncode"), text, guidance))


class Flux2TTRTinyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2TTRTinyDecode",
            display_name="Flux2 TTR Tiny Decode",
            category="advanced/latent/flux2ttr",
            description="The tiny FLUX.2 teacher's latent-to-RGB decoder (it has no VAE): a FLUX.2 LATENT to an IMAGE "
                        "16x the latent grid.",
            inputs=[io.Latent.Input("samples"), _codec_input()],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict, codec: str) -> io.NodeOutput:
        return io.NodeOutput(tiny_nodes.decode(_codec(codec, "Flux2TTRTinyDecode"), samples["samples"]))


NODES = [Flux2TTRController, RandomSeedBatch, LoadPromptListFromJSON, ClockedSweepValues, Combinations,
         Flux2TTRTinyTextEncode, Flux2TTRTinyDecode]
