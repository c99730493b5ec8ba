"""GGUF speed benchmark in llama.cpp: pp512 and tg128 (llama-bench's conventions) of the dense and the
8-layer-pruned SmolLM2-135M at every output type, in one run.

    python bench/gguf_speed.py                       # -> bench/results/gguf-speed-smollm2-135m.{json,md,png}
"""

from __future__ import annotations

from speed_common import arguments, run

from slimllm.latency.profiles import BackendSpec, TargetProfile


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--types", default="f32,f16,q8_0,q4_0,q4_k_m")
    args = parser.parse_args()
    profile = TargetProfile(
        name="gguf-speed",
        description="llama.cpp on the CPU at every GGUF type",
        device_class="x86-64 CPU",
        threads=args.threads,
        prompt_lengths=[512],
        generate_tokens=128,
        repeats=args.repeats,
        warmup=1,
        backends=[BackendSpec(kind="llama.cpp", gguf_types=[t.strip() for t in args.types.split(",")])],
    )
    run(f"gguf-speed-{args.model}", profile, args)


if __name__ == "__main__":
    main()
