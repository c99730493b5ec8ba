"""An onnxruntime session over an optimum-layout decoder (`input_ids`, `attention_mask`, `position_ids`, KV cache).

    >>> runner = OrtCausalLM(Path("out/onnx/model.onnx"), provider="auto")
    >>> logits, past = runner.forward(ids, mask)           # prefill
    >>> tokens = runner.greedy(prompt_ids, max_new_tokens=32)

The provider is chosen once (CUDA EP when onnxruntime-gpu and a GPU are present, else CPU EP). onnxruntime falls
back to the CPU EP silently when the CUDA EP cannot load; `fallback` records that, so reports never claim a GPU
figure that was measured on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from slimllm.core.errors import ExportError, MissingDependencyError, UserInputError, first_line
from slimllm.exporters.parity import position_ids_from_mask

log = logging.getLogger(__name__)


class Provider(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


ORT_PROVIDER_NAMES = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider"}

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("onnxruntime is not installed; run `pip install onnxruntime`") from exc
    return onnxruntime


def resolve_provider(requested: Provider | str = Provider.AUTO) -> Provider:
    """`auto` is CUDA when onnxruntime-gpu offers the CUDA EP and a GPU is visible, else CPU."""
    ort = import_onnxruntime()
    requested = Provider(requested)
    available = ort.get_available_providers()
    cuda_usable = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if requested is Provider.AUTO:
        return Provider.CUDA if cuda_usable else Provider.CPU
    if requested is Provider.CUDA and not cuda_usable:
        reason = (
            "no CUDA GPU is visible"
            if "CUDAExecutionProvider" in available
            else "the installed onnxruntime has no CUDA EP (install the `gpu` extra: `make install-gpu`)"
        )
        raise UserInputError(f"--provider cuda requested but {reason}; use --provider cpu")
    return requested


def _static_dim(value, model_path: Path, which: str) -> int:
    """A KV-cache dimension: static in optimum exports, symbolic in genai ones (then read from the configs)."""
    if isinstance(value, int):
        return value
    import json

    genai_config = model_path.parent / "genai_config.json"
    if genai_config.is_file():
        decoder = json.loads(genai_config.read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"] if which == "kv_heads" else decoder["head_size"])
    config = json.loads((model_path.parent / "config.json").read_text())
    if which == "kv_heads":
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


class OrtCausalLM:
    """Runs one exported decoder with its KV cache through onnxruntime."""

    def __init__(
        self,
        model_path: Path,
        provider: Provider | str = Provider.AUTO,
        threads: int | None = None,
    ) -> None:
        ort = import_onnxruntime()
        self.model_path = Path(model_path)
        self.provider = resolve_provider(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [ORT_PROVIDER_NAMES[self.provider]]
        if self.provider is Provider.CUDA:
            providers.append("CPUExecutionProvider")  # nodes the CUDA EP lacks run on the CPU, as usual
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
            raise ExportError(f"onnxruntime cannot load {self.model_path}: {first_line(exc)}") from exc
        self.active_providers = self.session.get_providers()
        self.fallback = self.active_providers[0] != ORT_PROVIDER_NAMES[self.provider]
        if self.fallback:
            log.warning(
                "onnxruntime fell back to %s although %s was requested",
                self.active_providers[0],
                ORT_PROVIDER_NAMES[self.provider],
            )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = sorted(
            (name for name in inputs if name.startswith("past_key_values.")),
            key=lambda name: (int(name.split(".")[1]), name.split(".")[2]),
        )
        self.num_layers = len(self.past_names) // 2
        if self.num_layers == 0:
            raise UserInputError(
                f"{self.model_path} has no past_key_values inputs; export with the text-generation-with-past task"
            )
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = (
            _static_dim(first.shape[1], self.model_path, "kv_heads"),
            _static_dim(first.shape[3], self.model_path, "head_dim"),
        )
        self.kv_dtype = _ORT_TYPES.get(first.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def provider_used(self) -> str:
        return self.active_providers[0]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.kv_dtype) for name in self.past_names}

    def forward(
        self,
        ids: np.ndarray,
        mask: np.ndarray | None = None,
        past: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (fp32) for `ids` after the cached tokens in `past`, and the new cache."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch = ids.shape[0]
        past = past if past is not None else self.empty_past(batch)
        past_length = next(iter(past.values())).shape[2]
        if mask is None:
            mask = np.ones((batch, past_length + ids.shape[1]), dtype=np.int64)
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask.astype(np.int64), **past}
        if "position_ids" in self.input_names:
            feed["position_ids"] = position_ids_from_mask(mask, past_length)
        outputs = self.session.run(None, feed)
        named = dict(zip(self.output_names, outputs, strict=True))
        new_past = {name: named[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return named["logits"].astype(np.float32, copy=False), new_past

    def decode_bound(self, first_token: int, steps: int) -> list[int]:
        """Greedy decoding of `steps` tokens from an empty cache with the KV cache bound on the session's device.

        IOBinding keeps every layer's present/past tensors where the execution provider put them (GPU memory on the
        CUDA EP); only the token id, the mask and the logits cross to the host each step. This is what the latency
        profile times, so that it measures the model rather than host copies of the cache.
        """
        ort = import_onnxruntime()
        device = "cuda" if self.provider_used == "CUDAExecutionProvider" else "cpu"
        past = {
            name: ort.OrtValue.ortvalue_from_numpy(value, device, 0) for name, value in self.empty_past(1).items()
        }
        present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        binding = self.session.io_binding()
        token, generated = int(first_token), []
        for step in range(steps):
            binding.bind_cpu_input("input_ids", np.array([[token]], dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, step + 1), dtype=np.int64))
            if "position_ids" in self.input_names:
                binding.bind_cpu_input("position_ids", np.array([[step]], dtype=np.int64))
            for name in self.past_names:
                binding.bind_ortvalue_input(name, past[name])
            binding.bind_output("logits", "cpu")
            for name in present_names:
                binding.bind_output(name, device, 0)
            self.session.run_with_iobinding(binding)
            outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
            past = {name: outputs[present] for name, present in zip(self.past_names, present_names, strict=True)}
            token = int(outputs["logits"].numpy()[0, -1].argmax())
            generated.append(token)
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return generated

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding through the KV cache; EOS is not special, so exactly `max_new_tokens` come back."""
        ids = np.array([list(prompt_ids)], dtype=np.int64)
        logits, past = self.forward(ids)
        mask = np.ones((1, ids.shape[1]), dtype=np.int64)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            generated.append(token)
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(np.array([[token]], dtype=np.int64), mask, past)
        return generated

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Input ids [b, t] -> logits [b, t, vocab], for the shared perplexity protocol."""

        def logits(input_ids: torch.Tensor) -> torch.Tensor:
            values, _ = self.forward(input_ids.cpu().numpy())
            return torch.from_numpy(values)

        return logits
