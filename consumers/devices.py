"""Where a worker renders: the device and the weights' dtype for `--device` and `--dtype`."""

from __future__ import annotations

import torch

from imagegen.schemas.errors import ConfigError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(choice: str) -> torch.device:
    """The device for `choice`: auto (cuda, else mps, else cpu), cuda, mps or cpu."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(kind for kind, usable in available.items() if usable))
    if choice not in available:
        raise ConfigError(f"device {choice!r} is not one of auto, cuda, mps, cpu")
    if not available[choice]:
        raise ConfigError(
            f"device {choice!r} is not available here ({_why_unavailable(choice)}); "
            "choose auto to take the best device there is, or cpu"
        )
    return torch.device(choice)


def _why_unavailable(kind: str) -> str:
    if kind == "mps":
        return "MPS needs Apple silicon and a torch build with MPS support"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    return "no CUDA GPU is visible; check the driver and CUDA_VISIBLE_DEVICES"


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for `choice`: auto (float16 on GPUs, float32 on cpu) or a dtype name."""
    if choice == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if choice not in _DTYPES:
        raise ConfigError(f"dtype {choice!r} is not one of auto, {', '.join(_DTYPES)}")
    if choice == "float16" and device.type == "cpu":
        raise ConfigError(
            "float16 on cpu is far slower than float32 and some operators lack it; "
            "choose float32, or bfloat16 to halve the memory"
        )
    return _DTYPES[choice]
