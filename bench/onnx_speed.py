"""ONNX speed benchmark: TTFT and decode tokens/s of PyTorch eager, our ONNX fp32 and int4, and the genai engine
fp32 and int4, for the dense and the 8-layer-pruned SmolLM2-135M, in one run.

    python bench/onnx_speed.py                       # -> bench/results/onnx-speed-smollm2-135m.{json,md,png}
"""

from __future__ import annotations

from speed_common import arguments, run

from slimllm.latency.profiles import BackendSpec, TargetProfile

BACKENDS = "torch-fp32,onnxruntime-fp32,onnxruntime-int4,genai-fp32,genai-int4"


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=BACKENDS,
                        help="KIND-DTYPE list (genai cannot run blocks without attention: leave it out for 2SSP).")
    args = parser.parse_args()
    backends = []
    for item in args.backends.split(","):
        kind, _, dtype = item.strip().rpartition("-")
        backends.append(BackendSpec(kind=kind, dtype=dtype))
    profile = TargetProfile(
        name="onnx-speed",
        description="PyTorch eager vs optimum ONNX (fp32, int4) vs onnxruntime-genai (fp32, int4) on the CPU",
        device_class="x86-64 CPU",
        threads=args.threads,
        prompt_lengths=[128, 512],
        generate_tokens=128,
        repeats=args.repeats,
        warmup=1,
        backends=backends,
    )
    run(f"onnx-speed-{args.model}", profile, args)


if __name__ == "__main__":
    main()
