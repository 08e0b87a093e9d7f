"""Random-weight files for the quality models, each in the format its package's own loader reads.

No pretrained DreamSim, HPSv2 or pyiqa weights can be had here, so these write seeded random weights
where the real files would be, and the real loading code (``flux2ttr.routing.quality``, which calls
each package's loader) reads them. The formats are the packages' own: DreamSim's checkpoint folder
(torch ``.pth``/``.pth.tar`` base models, a peft LoRA folder with safetensors, torch.hub's cache for
DINO), pyiqa's ``{"params": state_dict}`` ``.pth`` and HPSv2's ``{"state_dict": ...}`` ``.pt``; torch
files are written only because those packages read nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# DINO's hub repo as torch.hub caches it (``<hub dir>/facebookresearch_dino_main``): the layout and the
# import that matter, not DINO's code. ``hubconf`` imports its sibling ``vision_transformer`` as a
# top-level module, and that one imports ``trunc_normal_`` from a top-level ``utils`` -- the import that
# ComfyUI's own ``utils`` package shadows once ComfyUI has imported it. The network is DreamSim's
# bundled copy of the same ViT; the weights come from torch.hub's checkpoint cache, as DINO's do.
DINO_HUB_REPO = "facebookresearch_dino_main"
DINO_CHECKPOINT = "dino_vitbase16_pretrain.pth"  # the file name of DINO's ViT-B/16 download URL
_HUBCONF = f'''"""Stand-in for DINO's hubconf (test fixture): entry dino_vitb16, weights from the hub cache."""
import torch

import vision_transformer as vits

dependencies = ["torch"]


def dino_vitb16(pretrained=True, **kwargs):
    model = vits.vit_base(patch_size=16, num_classes=0, **kwargs)
    if pretrained:
        sd = torch.hub.load_state_dict_from_url(
            url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/{DINO_CHECKPOINT}",
            map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
    return model
'''
_VISION_TRANSFORMER = '''"""Stand-in for DINO's vision_transformer.py: the same top-level utils import."""
from utils import trunc_normal_  # noqa: F401  (DINO's own utils.py; ComfyUI's utils package shadows it)

from dreamsim.feature_extraction.vision_transformer import vit_base  # noqa: F401
'''
_UTILS = '''"""Stand-in for DINO's utils.py."""
from torch.nn.init import trunc_normal_  # noqa: F401
'''

# the LoRA adapter written for DreamSim's ensemble (DINO ViT-B/16 CLS + CLIP and OpenCLIP ViT-B/16 embeddings)
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "target_modules": ["qkv"]}




def _clip_as_vit(seed: int) -> dict[str, torch.Tensor]:
    """A CLIP-as-DINO ViT-B/16 state dict as DreamSim stores it: ``pos_drop`` is a LayerNorm, ``proj [768, 512]``."""
    from dreamsim.feature_extraction.vision_transformer import vit_base

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = vit_base(patch_size=16)
        vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
        sd = dict(vit.state_dict())
        sd["proj"] = torch.randn(768, 512) / 768 ** 0.5
    return sd


def write_dreamsim_cache(root: Path, seed: int = 0) -> Path:
    """A DreamSim ``ensemble`` checkpoint folder (what ``quality.dreamsim_cache_dir`` names) with random
    weights: the three base models, DINO's torch.hub repo and checkpoint, and a LoRA adapter with non-zero
    ``lora_B`` (so loading it changes the distances). Returns ``root``."""
    from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base

    from flux2ttr.routing.quality import dreamsim_hub_guard

    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino = vit_base(patch_size=16, num_classes=0).state_dict()
        head = DINOHead(768, 2048)
    (root / "checkpoints").mkdir(exist_ok=True)
    torch.save(dino, root / "checkpoints" / DINO_CHECKPOINT)
    # DreamSim reads the DINO projection head from its own file (DINO's training checkpoint layout)
    student = {f"module.head.{k}": v for k, v in head.state_dict().items() if k.startswith("mlp.")}
    student["module.head.last_layer.weight"] = head.last_layer.weight.detach().clone()
    torch.save({"student": student}, root / "dino_vitb16_pretrain.pth")
    torch.save({"state_dict": _clip_as_vit(seed + 1)}, root / "clip_vitb16_pretrain.pth.tar")
    torch.save({"state_dict": _clip_as_vit(seed + 2)}, root / "open_clip_vitb16_pretrain.pth.tar")
    hub = root / DINO_HUB_REPO
    hub.mkdir(exist_ok=True)
    for name, text in (("hubconf.py", _HUBCONF), ("vision_transformer.py", _VISION_TRANSFORMER), ("utils.py", _UTILS)):
        (hub / name).write_text(text)
    # the LoRA folder, written by peft itself from the model DreamSim builds on these files
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    with dreamsim_hub_guard():
        base = PerceptualModel(**dreamsim_args["model_config"]["ensemble"], device="cpu", load_dir=str(root),
                               normalize_embeds=True)
    peft_model = get_peft_model(base, LoraConfig(**LORA))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 3)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(root / "ensemble_lora"))
    cfg = json.loads((root / "ensemble_lora" / "adapter_config.json").read_text())
    assert cfg["r"] == LORA["r"] and (root / "ensemble_lora" / "adapter_model.safetensors").is_file()
    return root


def write_pyiqa_weights(path: Path, metric: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """pyiqa ``metric``'s network with random weights (backbone included), saved as pyiqa's checkpoints
    are: ``{"params": state_dict}`` in a torch file. Returns the state dict written."""
    import pyiqa

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = pyiqa.create_metric(metric, device="cpu", as_loss=False, pretrained=False, backbone_pretrain=False).net
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": sd}, path)
    return sd


def write_hps_checkpoint(path: Path, model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An HPSv2-format checkpoint (``{"state_dict": ...}``, torch file) of hpsv2's open_clip ``model`` with
    random weights. Returns the state dict written."""
    from hpsv2.src import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(model, pretrained=None, device="cpu")
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, path)
    return sd
