"""Where a model's modules live: one device, or spread by accelerate over GPUs, host memory and disk.

    >>> placement = Placement.parse("auto", max_memory="0=20GiB,1=20GiB,cpu=64GiB")
    >>> loaded = load_model("Qwen/Qwen2.5-3B", placement=placement)     # layers spread over two GPUs and the host
    >>> input_device(loaded.model)                                       # where input ids go: the embedding's device

A spread model runs unchanged: accelerate's hooks move activations between devices and load a module's offloaded
weights only while it runs. What it cannot do is train or edit weights that are offloaded (the offloaded copy is
read back on every forward, so an update would be lost); `check_placement_supports` says so in one line before
any work, with the setting that would work.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from slimllm.core.errors import UserInputError, parse_choice


class DeviceMap(str, Enum):
    """accelerate's strategies for spreading a model's layers over the devices it may use."""

    NONE = "none"
    """The whole model on `--device`."""
    AUTO = "auto"
    """Fill the GPUs in order (balanced when there are several), then host memory, then disk."""
    BALANCED = "balanced"
    BALANCED_LOW_0 = "balanced_low_0"
    """Balanced, with as little as possible on GPU 0 (which holds generation's extra buffers)."""
    SEQUENTIAL = "sequential"
    """Fill GPU 0, then GPU 1, ... then host memory, then disk."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """`20GiB`, `500MB`, `1.5GB` or a plain byte count, in bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UserInputError(f"{flag}: cannot read {text!r} as a size; write it like 20GiB, 500MB or 1073741824")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").lower()])


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """`0=20GiB,1=20GiB,cpu=64GiB` as accelerate's max_memory: GPU index or `cpu` -> bytes."""
    if text is None or not text.strip():
        return None
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower().removeprefix("cuda:")
        if not sep or not key:
            raise UserInputError(
                f"--max-memory: {part.strip()!r} is not DEVICE=SIZE; write it like 0=20GiB,1=20GiB,cpu=64GiB"
            )
        if key.isdigit():
            index = int(key)
            count = torch.cuda.device_count()
            if index >= count:
                raise UserInputError(
                    f"--max-memory names GPU {index}, but this machine has {count} CUDA GPU(s); "
                    "name only GPUs it has, and cpu"
                )
            limits[index] = parse_size(value)
        elif key == "cpu":
            limits["cpu"] = parse_size(value)
        else:
            raise UserInputError(f"--max-memory: unknown device {key!r}; use GPU indices (0, 1, ...) and cpu")
    return limits


def _size_text(size: int) -> str:
    return f"{size / 2**30:.1f}GiB" if size >= 2**30 else f"{size / 2**20:.0f}MiB"


@dataclass(frozen=True)
class Placement:
    """How to place a model: `device_map` NONE keeps it whole on one device, the rest spread it with accelerate."""

    device_map: DeviceMap = DeviceMap.NONE
    max_memory: dict[int | str, int] | None = None
    """Bytes each device may hold (GPU index or `cpu`); None lets accelerate use what is free."""
    offload_folder: Path | None = None
    """Where weights that fit nowhere else are written (a checkpoint in safetensors is read in place instead);
    slimllm makes a folder of its own inside it and removes that when the model is freed."""

    @classmethod
    def parse(
        cls, device_map: str | None = None, max_memory: str | None = None, offload_folder: Path | str | None = None,
        device: str = "auto",
    ) -> Placement:
        """From the CLI's `--device-map`, `--max-memory`, `--offload-folder` (and `--device`, which a spread
        model does not take)."""
        mode = parse_choice(DeviceMap, device_map or DeviceMap.NONE.value, "--device-map")
        if mode is DeviceMap.NONE:
            if max_memory or offload_folder:
                raise UserInputError("--max-memory and --offload-folder place a spread model; add --device-map auto")
            return cls()
        if (device or "auto").lower() != "auto":
            raise UserInputError(
                f"--device-map {mode.value} chooses the devices itself; drop --device {device} "
                "(limit devices with --max-memory, e.g. 0=20GiB,cpu=64GiB)"
            )
        folder = Path(offload_folder).expanduser() if offload_folder else None
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UserInputError(f"--offload-folder {folder} is a file; give a directory")
        return cls(mode, parse_max_memory(max_memory), folder)

    @property
    def spread(self) -> bool:
        return self.device_map is not DeviceMap.NONE

    def describe(self) -> str:
        if not self.spread:
            return "one device"
        limits = ", ".join(f"{key}={_size_text(value)}" for key, value in (self.max_memory or {}).items())
        return f"device_map={self.device_map.value}" + (f" ({limits})" if limits else "")

    def from_pretrained_kwargs(self) -> dict:
        """What `from_pretrained` takes to spread the model (empty for one device); the offload folder is a fresh
        one slimllm owns (see `owned_offload_folder`)."""
        if not self.spread:
            return {}
        kwargs: dict = {"device_map": self.device_map.value, "offload_folder": str(owned_offload_folder(self))}
        if self.max_memory:
            kwargs["max_memory"] = dict(self.max_memory)
        return kwargs


def owned_offload_folder(placement: Placement) -> Path:
    """A new, empty folder for this load's offloaded weights, inside `--offload-folder` or slimllm's cache."""
    from slimllm.core.artifacts import cache_dir

    parent = placement.offload_folder or cache_dir() / "offload"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="slimllm-offload-", dir=parent))


def release_offload_folder_with(model: nn.Module, folder: Path) -> None:
    """Remove the folder slimllm made for `model`'s offloaded weights once the model is freed (or at exit)."""
    weakref.finalize(model, shutil.rmtree, str(folder), True)


def device_map_of(model: nn.Module) -> dict[str, str]:
    """Module name -> device (`cpu`, `disk`, a GPU index as text) for a spread model; empty for a whole one."""
    return {name: str(device) for name, device in (getattr(model, "hf_device_map", None) or {}).items()}


def is_spread(model: nn.Module) -> bool:
    """The model was placed by accelerate (its hooks move activations and offloaded weights)."""
    return bool(getattr(model, "hf_device_map", None))


def offloaded_entries(model: nn.Module) -> dict[str, str]:
    """The device map's entries whose weights are offloaded: on disk, and in host memory when the model runs on
    GPUs (on a machine without one, `cpu` is where the model runs)."""
    device_map = device_map_of(model)
    on_gpu = any(device not in ("cpu", "disk") for device in device_map.values())
    offload = {"disk", "cpu"} if on_gpu else {"disk"}
    return {name: device for name, device in device_map.items() if device in offload}


@dataclass(frozen=True)
class PlacementNeeds:
    """What a piece of work needs from the placement of the model it runs on."""

    work: str
    """Named in the error, e.g. `--method 2ssp`."""
    trains_weights: bool = False
    edits_weights: bool = False
    alternatives: list[str] = field(default_factory=list)
    """Settings that avoid the need, offered in the error."""


def check_placement_supports(model: nn.Module, needs: PlacementNeeds) -> None:
    """One line, before any work, where a spread model cannot do what is asked: weights cannot be trained across a
    device map (their optimizer state and gradients would sit on whichever device each layer landed), and
    offloaded weights cannot be edited (the offloaded copy is read back on the next forward)."""
    if not is_spread(model):
        return
    refuse_weight_training(needs)
    instead = _instead(needs)
    offloaded = offloaded_entries(model)
    if needs.edits_weights and offloaded:
        where = sorted(set(offloaded.values()))
        raise UserInputError(
            f"{needs.work} edits weights, and {len(offloaded)} of the model's {len(device_map_of(model))} placed "
            f"modules are offloaded to {' and '.join(where)}; raise --max-memory so that every layer fits on a "
            f"device, or {instead}"
        )


def _instead(needs: PlacementNeeds) -> str:
    return "; ".join(needs.alternatives + ["--device-map none holds the whole model on one device"])


def refuse_weight_training(needs: PlacementNeeds) -> None:
    """The part of `check_placement_supports` known before loading: a spread model trains no weights."""
    if needs.trains_weights:
        raise UserInputError(f"{needs.work} trains weights, which a --device-map model cannot; {_instead(needs)}")


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: the execution device accelerate's hook moves it to where it has one (its
    weights may be offloaded on `meta`), else the device of its first resident parameter, else the CPU."""
    for part in module.modules():
        device = _hook_device(part)
        if device is not None:
            return device
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the device its embedding runs on (for a model on one device, that device)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


@contextmanager
def weights_held(module: nn.Module) -> Iterator[None]:
    """Load an offloaded module's weights once for several forward calls, and offload them again after.

    accelerate reads an offloaded module's weights back (from host memory or disk) at every call and drops them after
    it; a layer that runs over every calibration minibatch in turn would read them once per minibatch. A module with
    nothing offloaded is left as it is; a load that fails offloads again what was already loaded."""
    from accelerate.utils import has_offloaded_params

    loaded = []
    try:
        for part in [part for part in module.modules() if has_offloaded_params(part)]:
            part._hf_hook.pre_forward(part)
            part._hf_hook.offload = False
            loaded.append(part)
        yield
    finally:
        for part in loaded:
            part._hf_hook.offload = True
            part._hf_hook.post_forward(part, None)


def parameter_value(model: nn.Module, name: str, parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's values even where accelerate offloaded it (then read from the hook's weights map)."""
    if parameter.device.type != "meta":
        return parameter
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None or leaf not in weights_map:
        raise RuntimeError(f"{name} is offloaded and its hook holds no copy of it")
    return weights_map[leaf]
