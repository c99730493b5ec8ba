"""slimllm: an edge-deployment compiler for decoder-only LLMs.

    >>> import slimllm
    >>> loaded = slimllm.load_model("smollm2-135m")

The stages are plain functions: `load_model`, `run_prune`, `evaluate_model`, `run_profile`, and `compile` chains
them; `run_frontier` measures the dense model's quantization ladder against pruned variants and chooses one.
The exporters live in `slimllm.exporters` (`slimllm.exporters.onnx.export_onnx`, `slimllm.exporters.gguf.export_gguf`);
their sources sit in the repository's top-level `exporters/` folder.
Attributes are imported lazily so that `import slimllm` stays cheap for the CLI.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "slimllm.models.loading",
    "run_prune": "slimllm.pruning.stage",
    "PruneSettings": "slimllm.pruning.stage",
    "evaluate_model": "slimllm.evaluation.perplexity",
    "EvalSettings": "slimllm.evaluation.perplexity",
    "compile": "slimllm.pipeline.compiler",
    "CompileSettings": "slimllm.pipeline.compiler",
    "run_profile": "slimllm.latency.profiler",
    "run_frontier": "slimllm.frontier.run",
    "FrontierSettings": "slimllm.frontier.settings",
    "load_profile": "slimllm.latency.profiles",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimllm' has no attribute {name!r}")
