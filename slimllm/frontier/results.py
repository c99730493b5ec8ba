"""One candidate's measurements, as the frontier table, the charts and the choice read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slimllm.frontier.pareto import Interval


@dataclass
class CandidateResult:
    """A candidate artifact and everything measured about it (None: not measured)."""

    name: str
    """`dense q4_0`, `shortgpt-8 q8_0`, `dense int4` (ONNX names its variant, GGUF its type)."""
    model: str
    """`dense`, or the pruned variant's label."""
    backend: str
    """`llama.cpp` or `onnxruntime`."""
    quant: str
    artifact: str
    size_bytes: int
    quality: dict[str, Any] = field(default_factory=dict)
    """Against the dense model on the evaluation windows: ppl, ppl_ratio, kld (mean, stderr, 99%), same_top1."""
    task: dict[str, Any] | None = None
    """acc_norm and its standard error, acc, the per-token rule and the task count."""
    speed: dict[str, Any] | None = None
    """`ppN` and `tgN` tokens/s (median, min, max over the repeats), peak RSS while generating."""
    notes: list[str] = field(default_factory=list)
    """Why something was not measured (a skipped candidate, a failed backend)."""

    @property
    def kld(self) -> float:
        return float(self.quality.get("kld", {}).get("mean", float("inf")))

    @property
    def kld_interval(self) -> Interval:
        kld = self.quality.get("kld", {})
        return Interval.around(self.kld, float(kld.get("stderr", 0.0)))

    @property
    def ppl_ratio(self) -> float | None:
        return self.quality.get("ppl_ratio")

    def _rate(self, prefix: str) -> dict[str, float] | None:
        """The `ppN` (or `tgN`) rate with the largest N: prefill at the longest prompt the profile measures."""
        if not self.speed:
            return None
        keys = [k for k, v in self.speed.items() if k.startswith(prefix) and k[2:].isdigit() and isinstance(v, dict)]
        return self.speed[max(keys, key=lambda k: int(k[2:]))] if keys else None

    @property
    def decode(self) -> Interval | None:
        rate = self._rate("tg")
        return Interval(rate["median"], rate["min"], rate["max"]) if rate else None

    @property
    def prefill(self) -> Interval | None:
        rate = self._rate("pp")
        return Interval(rate["median"], rate["min"], rate["max"]) if rate else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode.value if self.decode else None

    def describe(self, baseline: CandidateResult | None = None) -> str:
        """`decode 231 tok/s (1.91× dense f16), 109 MiB, KLD 0.052 ± 0.002, PPL × 1.61, hellaswag 31.8 ± 2.3 %`."""
        parts = []
        if self.decode is not None:
            speed = f"decode {self.decode.value:.0f} tok/s"
            if baseline is not None and baseline.decode is not None and baseline is not self:
                speed += f" ({self.decode.value / baseline.decode.value:.2f}× {baseline.name})"
            parts.append(speed)
        parts.append(f"{self.size_bytes / 2**20:.0f} MiB")
        kld = self.quality.get("kld", {})
        if kld:
            parts.append(f"KLD {kld['mean']:.4f} ± {kld.get('stderr', 0):.4f}")
        if self.ppl_ratio is not None:
            parts.append(f"PPL × {self.ppl_ratio:.3f}")
        if self.task:
            parts.append(f"{self.task['task']} {100 * self.task['acc_norm']:.1f} ± "
                         f"{100 * self.task['acc_norm_stderr']:.1f} %")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
