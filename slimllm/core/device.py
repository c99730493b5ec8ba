"""Device and dtype selection: CUDA when available, else CPU, with a sensible dtype per device.

>>> from slimllm.core.device import resolve_device, resolve_dtype
>>> device = resolve_device("auto"); dtype = resolve_dtype("auto", device)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum

import torch

from slimllm.core.errors import UserInputError, parse_choice


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
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {requested!r} requested but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserInputError(
            f"device {requested!r} requested but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); "
            "use one of those or --device auto"
        )
    return device


def resolve_dtype(requested: str | DType = DType.AUTO, device: torch.device | None = None) -> torch.dtype:
    """`auto` is fp32 on CPU (fast and exact there) and bf16 on CUDA (fp16 on GPUs without bf16)."""
    requested = parse_choice(DType, requested, "--dtype")
    device = device or resolve_device("auto")
    if requested is DType.AUTO:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _TORCH_DTYPES[requested]


@dataclass(frozen=True)
class Precision:
    """How a model is held and computed: weights in `weights`, matmuls under autocast to `compute` where lower.

    Inference holds the weights in the compute dtype. Training keeps fp32 master weights (the optimizer's updates
    would vanish in bf16 rounding) and computes in bf16/fp16 under autocast on CUDA.
    """

    weights: torch.dtype
    compute: torch.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.compute == self.weights else self.compute


def inference_precision(requested: str | DType, device: torch.device) -> Precision:
    dtype = resolve_dtype(requested, device)
    return Precision(weights=dtype, compute=dtype)


def training_precision(requested: str | DType, device: torch.device) -> Precision:
    """fp32 master weights; compute in the requested dtype (auto: bf16/fp16 on CUDA, fp32 on CPU)."""
    return Precision(weights=torch.float32, compute=resolve_dtype(requested, device))


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype `model` computes in under autocast, or None where it runs in its weights' own dtype.

    Set by `set_compute_dtype` (the loaders and the training stages do); a model nobody set runs as stored.
    """
    dtype = getattr(model, _COMPUTE_DTYPE_ATTR, None)
    weights = next(model.parameters()).dtype
    return None if dtype is None or dtype == weights else dtype


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Record the dtype `model` should compute in; lower than its weights' dtype means autocast."""
    setattr(model, _COMPUTE_DTYPE_ATTR, dtype)


_COMPUTE_DTYPE_ATTR = "_slimllm_compute_dtype"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; a no-op for None (the model runs in its weights' dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the compute dtype recorded on `model` (see `set_compute_dtype`), on the model's device."""
    from slimllm.core.placement import input_device

    return autocast(input_device(model), autocast_dtype(model))


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype, as written in reports (`fp32`, `bf16`, ...)."""
    for key, value in _TORCH_DTYPES.items():
        if value == dtype:
            return key.value
    return str(dtype).replace("torch.", "")
