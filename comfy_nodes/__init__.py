"""flux2ttr ComfyUI node pack (V3 schema): ``comfy_entrypoint`` returns the extension.

Install: put this folder (or a symlink to it) into ``ComfyUI/custom_nodes`` and ``pip install`` the
flux2ttr project into ComfyUI's Python, or run ``flux2ttr comfy-install COMFYUI_DIR``.
"""

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES, register_model_folder


class Flux2TTRExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> Flux2TTRExtension:
    return Flux2TTRExtension()
