"""Run the real ComfyUI headless inside a pytest process (shared by tests/test_comfy_*.py): on CPU
(``--cpu``) by default, on the GPU with ``start_comfy(..., gpu=True)`` (the GPU tests).

ComfyUI keeps module-level global state (folder paths, node registry, model management), so it is
imported once per process: :func:`start_comfy` is called by the session fixture in ``conftest.py``.
The tree is found through ``COMFYUI_PATH`` (default ``<repo>/../shared/ComfyUI``); a missing tree is an
error, never a skip. Nothing is written into the tree: models, custom nodes, output, input and user
folders live in a temp dir.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK_DIR = REPO / "comfy_nodes"

# test-only nodes registered next to the built-in ones
TEST_COND_NODE = "Flux2TTRTestConditioning"
TEST_CAPTURE_NODE = "Flux2TTRTestCapture"


def comfyui_path() -> Path:
    """The ComfyUI tree to test against: ``$COMFYUI_PATH`` or ``<repo>/../shared/ComfyUI``."""
    path = Path(os.environ.get("COMFYUI_PATH") or REPO.parent / "shared" / "ComfyUI").resolve()
    if not (path / "nodes.py").is_file() or not (path / "execution.py").is_file():
        raise RuntimeError(
            f"ComfyUI not found at {path} (no nodes.py/execution.py): set COMFYUI_PATH to a ComfyUI checkout"
        )
    return path


def install_placeholders() -> list[str]:
    """Import placeholders for what ComfyUI imports but FLUX.2 never uses, where missing (torchaudio; a
    ``comfy_kitchen`` stand-in): the library's own, which the comfyui teacher installs too."""
    from flux2ttr.teachers.comfyui import install_import_placeholders

    return install_import_placeholders()


class _Server:
    """What PromptExecutor needs of ComfyUI's server: no client, messages kept for inspection."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))


@dataclass
class Comfy:
    """A started ComfyUI: its modules, temp folders, and a way to run API-format prompts."""

    root: Path
    base: Path
    modules: dict[str, Any]
    captured: dict[str, list[Any]] = field(default_factory=dict)
    gpu: bool = False  # started without --cpu (ComfyUI picks the CUDA device)

    @property
    def nodes(self):  # noqa: ANN201
        return self.modules["nodes"]

    @property
    def folder_paths(self):  # noqa: ANN201
        return self.modules["folder_paths"]

    def run(self, prompt: dict[str, Any], outputs: list[str] | None = None) -> "RunResult":
        """Execute an API-format ``prompt`` through ``execution.PromptExecutor`` (fresh caches)."""
        execution = self.modules["execution"]
        server = _Server()
        executor = execution.PromptExecutor(
            server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
        )
        self.captured.clear()
        if outputs is None:
            outputs = [nid for nid, n in prompt.items() if n["class_type"] == TEST_CAPTURE_NODE]
        executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        return RunResult(executor.success, executor.status_messages, dict(self.captured), server.messages)

    def add_model_file(self, folder: str, src: Path, name: str | None = None) -> str:
        """Link ``src`` into ``<base>/models/<folder>`` (registered with ComfyUI); returns the file name."""
        target_dir = self.base / "models" / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        name = name or Path(src).name
        target = target_dir / name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(Path(src).resolve())
        if str(target_dir) not in self.folder_paths.get_folder_paths(folder):
            self.folder_paths.add_model_folder_path(folder, str(target_dir))
        return name


@dataclass
class RunResult:
    success: bool
    status_messages: list[Any]
    captured: dict[str, list[Any]]
    messages: list[tuple[str, Any]]

    def error(self) -> str:
        """The executor's error message ('' when the run succeeded)."""
        for event, data in self.status_messages:
            if event == "execution_error":
                return f"{data.get('exception_type')}: {data.get('exception_message')}"
        return ""


def _test_nodes(comfy: Comfy):  # noqa: ANN202 - returns V3 node classes
    import torch
    from comfy_api.latest import io

    class TestConditioning(io.ComfyNode):
        """Stands in for a text encoder: a seeded CONDITIONING ``[[tensor [1, T, dim], {"guidance": g}]]``."""

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=TEST_COND_NODE,
                display_name="flux2ttr test conditioning",
                category="testing",
                inputs=[
                    io.Int.Input("tokens", default=8, min=1, max=512),
                    io.Int.Input("dim", default=64, min=1, max=16384),
                    io.Int.Input("seed", default=0, min=0, max=2**31),
                    io.Float.Input("guidance", default=4.0, min=0.0, max=100.0),
                ],
                outputs=[io.Conditioning.Output()],
            )

        @classmethod
        def execute(cls, tokens: int, dim: int, seed: int, guidance: float) -> io.NodeOutput:
            g = torch.Generator().manual_seed(seed)
            context = torch.randn(1, tokens, dim, generator=g)
            return io.NodeOutput([[context, {"guidance": guidance}]])

    class TestCapture(io.ComfyNode):
        """An output node that keeps whatever it receives (whole lists) in ``comfy.captured``."""

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=TEST_CAPTURE_NODE,
                display_name="flux2ttr test capture",
                category="testing",
                is_output_node=True,
                is_input_list=True,
                inputs=[io.String.Input("key", default="value"), io.AnyType.Input("value")],
                outputs=[],
            )

        @classmethod
        def execute(cls, key: list[str], value: list[Any]) -> io.NodeOutput:
            comfy.captured[key[0]] = list(value)
            return io.NodeOutput()

    return [TestConditioning, TestCapture]


def start_comfy(base: Path, *, gpu: bool = False) -> Comfy:
    """Import ComfyUI from :func:`comfyui_path` with temp folders under ``base``, load the built-in
    nodes, the test-only nodes and the flux2ttr pack (through ``nodes.load_custom_node``).

    ``gpu``: start without ``--cpu`` (ComfyUI then runs on the CUDA device). ComfyUI is imported once
    per process, so one process runs either the CPU or the GPU ComfyUI tests."""
    root = comfyui_path()
    install_placeholders()
    for sub in ("output", "input", "user", "temp", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = [
        "main.py", *([] if gpu else ["--cpu"]), "--base-directory", str(base), "--output-directory",
        str(base / "output"), "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
        "--temp-directory", str(base / "temp"), "--disable-all-custom-nodes",
    ]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401 - parses sys.argv now
        import execution
        import folder_paths
        import nodes
    finally:
        sys.argv = saved_argv
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    comfy = Comfy(root=root, base=base, modules={"nodes": nodes, "execution": execution,
                                                 "folder_paths": folder_paths}, gpu=gpu)
    for node_cls in _test_nodes(comfy):
        schema = node_cls.GET_SCHEMA()
        nodes.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
    return comfy


def load_pack(comfy: Comfy, pack_dir: Path = PACK_DIR) -> bool:
    """Load the node pack folder exactly as ComfyUI's startup does."""
    return asyncio.run(comfy.nodes.load_custom_node(str(pack_dir)))


@dataclass
class TeacherFile:
    """The tiny teacher as the pipeline writes it: its folder, BFL single file, config and shape."""

    folder: Path
    path: Path
    config: Any
    num_heads: int
    layer_keys: list[str]


def tiny_teacher_file(tmp: Path) -> TeacherFile:
    """Write the tiny teacher of ``params.yaml`` (section ``teacher``) into ``tmp``."""
    from flux2ttr.config import load_section
    from flux2ttr.teachers.teacher import SINGLE_FILE_NAME, TeacherConfig, write_tiny_teacher

    cfg = load_section(TeacherConfig, "teacher", REPO / "params.yaml")
    folder = write_tiny_teacher(cfg, tmp / "tiny")
    keys = [f"double_blocks.{i}" for i in range(cfg.num_double)] + [f"single_blocks.{i}" for i in range(cfg.num_single)]
    return TeacherFile(folder=folder, path=folder / SINGLE_FILE_NAME, config=cfg, num_heads=cfg.num_heads,
                       layer_keys=keys)


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(comfy: Comfy, workflow: dict[str, Any]) -> dict[str, Any]:
    """Convert a UI-format workflow (what ComfyUI saves and opens) to an API-format prompt, the way the
    frontend does: linked inputs become ``[node_id, slot]``; widget values are taken in the order of the
    node's ``INPUT_TYPES`` (a widget with ``control_after_generate`` has one extra UI value after it)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node["type"]]
        types = cls.INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        pos = 0
        inputs: dict[str, Any] = {}
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                kind = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                    if isinstance(kind, list) or kind in WIDGET_TYPES:
                        pos += 1 + bool(opts.get("control_after_generate"))  # a converted widget keeps its slot
                elif (isinstance(kind, list) or kind in WIDGET_TYPES) and pos < len(values):
                    inputs[name] = values[pos]
                    pos += 1 + bool(opts.get("control_after_generate"))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
