"""Dtype names to torch dtypes, by one rule for every stage and script."""

from __future__ import annotations

from distill import DistillError


def default_dtype(device: str):
    """Inference dtype when the user picks none: float32 on CPU (its bf16 matmuls are slow);
    bfloat16 on a GPU that has it natively, else float16 (V100, T4: torch emulates bfloat16 there,
    slowly, and `torch.cuda.is_bf16_supported()` counts the emulation unless told not to)."""
    import torch

    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


# Names a user may give a dtype by (any case), each the torch attribute it stands for.
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def torch_dtype(name, device=None):
    """The torch dtype a dtype name means, by one rule for every stage and script: "float32"
    (fp32, float), "bfloat16" (bf16), "float16" (fp16, half), "float64" in any case, or a
    torch.dtype as it is; None or "auto" is the device's default (`default_dtype`; CPU when no
    device is given). Anything else, a non-floating type included, is one DistillError."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name is None or str(name).lower() == "auto":
        return default_dtype(device if device is not None else "cpu")
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DistillError(f"unknown floating-point dtype '{name}': use float32, bfloat16, float16 or auto")
    return dtype
