"""The ComfyUI runtime: what the node pack imports (core dependencies only: torch, safetensors, numpy)."""
