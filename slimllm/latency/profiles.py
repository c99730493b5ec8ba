"""Hardware target profiles: what to measure on a device class, read from the built-in `profiles/*.toml`.

    >>> profile = load_profile("cpu-x86")            # a built-in name, or a path to a TOML file
    >>> [b.kind for b in profile.backends]
    ['torch', 'onnxruntime', 'llama.cpp']

A profile names the device class, the backends with their execution provider and precision, the thread count,
the prompt and generation lengths and the repeats. Unknown keys are an error listing every bad key at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from slimllm.core.errors import UserInputError, parse_choice
from slimllm.core.settings import read_toml, refuse_unknown_keys, unknown_keys

PROFILES_DIR = Path(str(resources.files("slimllm.target_profiles")))
"""The built-in profiles: `profiles/` at the top of the repository, installed as the package
`slimllm.target_profiles` (the package-dir mapping `exporters/` uses), so a plain wheel install has them."""


class BackendKind(str, Enum):
    TORCH = "torch"
    """PyTorch eager (transformers), optionally torch.compile."""
    ONNXRUNTIME = "onnxruntime"
    """Our optimum-layout ONNX export in an onnxruntime session."""
    GENAI = "genai"
    """onnxruntime-genai's runtime on a model-builder export."""
    LLAMA_CPP = "llama.cpp"
    """llama.cpp through llama-cpp-python, one run per GGUF type."""


_BACKEND_CHOICES: dict[BackendKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    BackendKind.TORCH: (("cpu", "cuda"), ("fp32", "fp16", "bf16")),
    BackendKind.ONNXRUNTIME: (("cpu", "cuda"), ("fp32", "fp16", "int8", "int8-dynamic", "int4")),
    BackendKind.GENAI: (("cpu", "cuda"), ("fp32", "fp16", "int4")),
    BackendKind.LLAMA_CPP: (("cpu", "cuda", "metal"), ()),  # the precision is each row's GGUF type
}
"""The devices and precisions each backend really runs; a profile naming anything else is refused, so that no
row is measured in one precision under another's label."""


@dataclass
class BackendSpec:
    """One backend of a profile."""

    kind: BackendKind
    """torch, onnxruntime, genai or llama.cpp."""
    device: str = "cpu"
    """torch: cpu or cuda. onnxruntime/genai: the execution provider (cpu or cuda). llama.cpp: cpu, cuda or metal."""
    dtype: str = "fp32"
    """torch: fp32, fp16 or bf16. onnxruntime/genai: fp32, fp16, int8 or int4 (the export variant)."""
    gguf_types: list[str] = field(default_factory=lambda: ["q8_0"])
    """llama.cpp: GGUF types measured, one row each."""
    gpu_layers: int = 0
    """llama.cpp: layers offloaded to the GPU (-1: all)."""
    compile: bool = False
    """torch: wrap the model in torch.compile."""

    def __post_init__(self) -> None:
        self.kind = parse_choice(BackendKind, self.kind, "backend kind")
        devices, dtypes = _BACKEND_CHOICES[self.kind]
        device_type = str(self.device).split(":", 1)[0]
        if device_type not in devices:
            raise UserInputError(
                f"backend {self.kind.value}: device {self.device!r} is not one it runs on; use {', '.join(devices)}"
            )
        if dtypes and str(self.dtype) not in dtypes:
            raise UserInputError(
                f"backend {self.kind.value}: dtype {self.dtype!r} is not one it measures; use {', '.join(dtypes)}"
            )

    @property
    def label(self) -> str:
        if self.kind is BackendKind.LLAMA_CPP:
            return f"llama.cpp ({self.device})"
        suffix = " compiled" if self.compile else ""
        return f"{self.kind.value} {self.dtype} ({self.device}){suffix}"


@dataclass
class TargetProfile:
    """A device class and what to measure on it."""

    name: str
    description: str = ""
    device_class: str = "cpu"
    """Free text shown in reports, e.g. "x86 server CPU", "Jetson Orin (CUDA)", "Apple M-series (Metal)"."""
    threads: int = 0
    """CPU threads for every backend; 0 uses every core."""
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512])
    """Prompt lengths of the prefill measurements (llama-bench's pp)."""
    generate_tokens: int = 128
    """Tokens of the decode measurement (llama-bench's tg), generated one at a time from an empty cache."""
    repeats: int = 3
    """Measured repeats per model; dense and pruned alternate inside each repeat to cancel drift."""
    warmup: int = 1
    """Unmeasured runs per model before the repeats."""
    backends: list[BackendSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.generate_tokens < 1 or self.threads < 0:
            raise UserInputError("profile: repeats >= 1, warmup >= 0, generate_tokens >= 1 and threads >= 0")
        if not self.prompt_lengths or any(length < 1 for length in self.prompt_lengths):
            raise UserInputError("profile: prompt_lengths must be a non-empty list of positive lengths")
        if not self.backends:
            raise UserInputError(f"profile {self.name!r} names no [[backend]]")

    @property
    def resolved_threads(self) -> int:
        import os

        return self.threads or os.cpu_count() or 1

    def to_dict(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        for backend in payload["backends"]:
            backend["kind"] = backend["kind"].value if isinstance(backend["kind"], Enum) else backend["kind"]
        return payload


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> TargetProfile:
    """A profile by name (a file in profiles/, installed as slimllm.target_profiles) or by path."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        candidate = PROFILES_DIR / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise UserInputError(
                f"unknown profile {str(name_or_path)!r}; use one of {', '.join(available_profiles())} "
                "or a path to a TOML file"
            )
        path = candidate
    data = read_toml(path, "profile")
    problems = [f"[{key}]" for key in data if key not in ("profile", "backend")]
    profile_values = dict(data.get("profile", {}))
    problems += unknown_keys(profile_values, TargetProfile, "profile")
    backends = data.get("backend", [])
    if not isinstance(backends, list):
        problems.append("backend (must be an array of tables: [[backend]])")
        backends = []
    for index, backend in enumerate(backends):
        problems += unknown_keys(backend, BackendSpec, f"backend[{index}]")
    if "backends" in profile_values:
        problems.append("profile.backends (use [[backend]] tables)")
    refuse_unknown_keys(problems, "profile", path)
    profile_values.setdefault("name", path.stem)
    try:
        return TargetProfile(**profile_values, backends=[BackendSpec(**b) for b in backends])
    except TypeError as exc:
        raise UserInputError(f"profile {path} is invalid ({exc})") from exc
    except UserInputError as exc:
        raise UserInputError(f"profile {path}: {exc}") from exc
