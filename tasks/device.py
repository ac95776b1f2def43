"""Device selection shared by merge, kinship and evaluate."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> str:
    """Map a configured device to a torch device string; `auto` picks CUDA when present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this worker")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    return name
