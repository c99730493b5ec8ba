"""Load the ONNX export of a compile run with optimum's ORTModelForCausalLM and generate.

    python examples/ort_generate.py runs/demo/onnx "The tallest mountain in Europe is"

The directory is a standard optimum export (model.onnx, config, tokenizer), so the same lines work in any project
that uses optimum; pass provider="CUDAExecutionProvider" with onnxruntime-gpu.
"""

from __future__ import annotations

import sys

from transformers import AutoTokenizer

from slimllm.exporters.onnx import load_ort_causal_lm


def main() -> None:
    onnx_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/onnx"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "The tallest mountain in Europe is"
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    # optimum's ORTModelForCausalLM, with the KV-cache head size fixed for configs with an explicit head_dim.
    model = load_ort_causal_lm(onnx_dir, provider="CPUExecutionProvider")
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
