"""Device and dtype selection: CUDA when available, else CPU, with a sensible dtype per device.

>>> from slimllm.device import resolve_device, resolve_dtype
>>> device = resolve_device("auto"); dtype = resolve_dtype("auto", device)
"""

from __future__ import annotations

import contextlib
from enum import Enum

import torch

from slimllm.errors import UserInputError


class DType(str, Enum):
    """Precision a model is loaded and run in."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


_TORCH_DTYPES = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else CPU. An explicit `cuda` without a GPU is a user error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UserInputError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {requested!r} requested but no CUDA GPU is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(requested: str | DType = DType.AUTO, device: torch.device | None = None) -> torch.dtype:
    """`auto` is fp32 on CPU (fast and exact there) and bf16 on CUDA (fp16 on GPUs without bf16)."""
    requested = DType(requested)
    device = device or resolve_device("auto")
    if requested is DType.AUTO:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _TORCH_DTYPES[requested]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype used for training on `device`, or None where autocast is not used (CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op on CPU, where fp32 is both exact and fastest."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype, as written in reports (`fp32`, `bf16`, ...)."""
    for key, value in _TORCH_DTYPES.items():
        if value == dtype:
            return key.value
    return str(dtype).replace("torch.", "")
