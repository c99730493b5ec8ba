"""Latency runners: one loaded model per backend, with the same three measurements everywhere.

    >>> runner = make_runner(BackendSpec(kind="llama.cpp"), Path("pruned-Q8_0.gguf"), threads=2, max_context=700)
    >>> runner.prefill([17] * 512)          # seconds to process a 512-token prompt and pick the first token
    >>> runner.generate(128)                # seconds to generate 128 tokens one at a time from an empty cache

Every runner picks each next token by argmax on the host, so the backends do the same work per token. The prompt
is processed in one pass (logits of the last position are what a generation needs; see `lm_head_positions`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slimllm.core.errors import MissingDependencyError, UserInputError
from slimllm.latency.profiles import BackendKind, BackendSpec


class Runner(Protocol):
    lm_head_positions: str
    """`last` when the prompt pass computes logits for the last position only, `all` when for every position."""

    def prefill(self, prompt: Sequence[int]) -> float: ...

    def generate(self, tokens: int) -> float: ...

    def gpu_memory_bytes(self) -> int | None: ...


def _torch_device_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchRunner:
    lm_head_positions = "last"

    def __init__(self, spec: BackendSpec, checkpoint: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        import slimllm.models.attention_free  # noqa: F401  (registers slimllm's own model types: blocks without attention)
        from slimllm.core.device import resolve_device, resolve_dtype

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).to(self.device).eval()
        if spec.compile:
            self.model.forward = torch.compile(self.model.forward, dynamic=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _step(self, ids, past):
        out = self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def prefill(self, prompt: Sequence[int]) -> float:
        ids = self.torch.tensor([list(prompt)], device=self.device)
        with self.torch.inference_mode():
            _torch_device_sync(self.device)
            started = time.perf_counter()
            token, _ = self._step(ids, None)
            int(token)  # the first token is on the host
            return time.perf_counter() - started

    def generate(self, tokens: int) -> float:
        from transformers import DynamicCache

        with self.torch.inference_mode():
            token = self.torch.tensor([[1]], device=self.device)
            past = DynamicCache()
            _torch_device_sync(self.device)
            started = time.perf_counter()
            for _ in range(tokens):
                token, past = self._step(token, past)
            int(token)
            return time.perf_counter() - started

    def gpu_memory_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated(self.device))


class OrtRunner:
    lm_head_positions = "all"  # optimum's graph returns logits for every position

    def __init__(self, spec: BackendSpec, onnx_dir: Path, threads: int) -> None:
        from slimllm.exporters.ort_session import OrtCausalLM

        self.session = OrtCausalLM(Path(onnx_dir) / "model.onnx", provider=spec.device, threads=threads)
        self.provider_used = self.session.provider_used

    def prefill(self, prompt: Sequence[int]) -> float:
        ids = np.array([list(prompt)], dtype=np.int64)
        started = time.perf_counter()
        logits, _ = self.session.forward(ids)
        int(logits[0, -1].argmax())
        return time.perf_counter() - started

    def generate(self, tokens: int) -> float:
        started = time.perf_counter()
        self.session.decode_bound(1, tokens)  # the KV cache stays on the EP's device between steps
        return time.perf_counter() - started

    def gpu_memory_bytes(self) -> int | None:
        return _process_gpu_memory() if self.provider_used == "CUDAExecutionProvider" else None


class GenaiRunner:
    lm_head_positions = "all"

    def __init__(self, spec: BackendSpec, genai_dir: Path, threads: int) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise MissingDependencyError(
                "the genai backend needs onnxruntime-genai; install the `genai` extra (`pip install 'slimllm[genai]'`)"
            ) from exc
        self.og = og
        config = og.Config(str(genai_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        config.clear_providers()
        if spec.device == "cuda":
            config.append_provider("cuda")
        self.device = spec.device
        self.model = og.Model(config)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        return self.og.Generator(self.model, params)

    def prefill(self, prompt: Sequence[int]) -> float:
        generator = self._generator(len(prompt) + 1)
        started = time.perf_counter()
        generator.append_tokens([list(prompt)])
        generator.generate_next_token()  # greedy pick of the first token, as the other runners do
        return time.perf_counter() - started

    def generate(self, tokens: int) -> float:
        generator = self._generator(tokens + 1)
        started = time.perf_counter()
        generator.append_tokens([[1]])
        for _ in range(tokens):
            generator.generate_next_token()
        return time.perf_counter() - started

    def gpu_memory_bytes(self) -> int | None:
        return _process_gpu_memory() if self.device == "cuda" else None


class LlamaCppRunner:
    lm_head_positions = "last"

    def __init__(self, spec: BackendSpec, gguf_path: Path, threads: int, max_context: int) -> None:
        from slimllm.exporters.llama_cpp_runner import LlamaCppModel, import_llama_cpp

        llama_cpp = import_llama_cpp()
        if spec.gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            raise MissingDependencyError(
                f"the profile offloads layers to {spec.device}, but this llama-cpp-python build has no GPU backend; "
                "rebuild it with CMAKE_ARGS='-DGGML_CUDA=on' (or -DGGML_METAL=on on Apple silicon)"
            )
        self.llama_cpp = llama_cpp
        self.device = spec.device
        # Default F16 KV cache and last-position logits: what llama-cli and llama-bench run.
        self.model = LlamaCppModel(
            gguf_path,
            n_ctx=max_context,
            threads=threads,
            logits_all=False,
            f32_kv_cache=False,
            n_gpu_layers=spec.gpu_layers,
        )
        self.llm = self.model.llm
        self.n_vocab = self.model.n_vocab

    def _argmax(self) -> int:
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).argmax())

    def prefill(self, prompt: Sequence[int]) -> float:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(list(prompt))
        self._argmax()
        return time.perf_counter() - started

    def generate(self, tokens: int) -> float:
        self.llm.reset()
        token = 1
        started = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([token])
            token = self._argmax()
        return time.perf_counter() - started

    def gpu_memory_bytes(self) -> int | None:
        return _process_gpu_memory() if self.device == "cuda" and self.llm else None


def _process_gpu_memory() -> int | None:
    """GPU memory this process holds, from nvidia-smi (None where it is not available)."""
    import os
    import subprocess

    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in output.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(used.strip()) * 2**20
    return None


def make_runner(spec: BackendSpec, artifact: Path, threads: int, max_context: int) -> Runner:
    if spec.kind is BackendKind.TORCH:
        return TorchRunner(spec, artifact, threads)
    if spec.kind is BackendKind.ONNXRUNTIME:
        return OrtRunner(spec, artifact, threads)
    if spec.kind is BackendKind.GENAI:
        return GenaiRunner(spec, artifact, threads)
    if spec.kind is BackendKind.LLAMA_CPP:
        return LlamaCppRunner(spec, artifact, threads, max_context)
    raise UserInputError(f"unknown backend {spec.kind}")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def describe_runner(runner: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"lm_head_positions": runner.lm_head_positions}
    if isinstance(runner, OrtRunner):
        info["provider"] = runner.provider_used
    return info
