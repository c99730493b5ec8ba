"""Run a GGUF file from a compile run in llama.cpp through llama-cpp-python: a chat turn with the model's template.

    python examples/deploy_gguf.py runs/demo/gguf/pruned-Q4_K_M.gguf

The same file works with llama.cpp's own tools (https://github.com/ggml-org/llama.cpp):

    llama-cli    -m runs/demo/gguf/pruned-Q4_K_M.gguf -cnv -p "You are terse." -n 128
    llama-server -m runs/demo/gguf/pruned-Q4_K_M.gguf --host 127.0.0.1 --port 8080 -c 2048
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Name three rivers in Europe."}]}'
    llama-bench  -m runs/demo/gguf/pruned-Q4_K_M.gguf -p 512 -n 128     # the pp512 / tg128 figures of our report

The chat template, special tokens and the removed layers are in the file's metadata (`slimllm inspect FILE`).
"""

from __future__ import annotations

import sys

from llama_cpp import Llama


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/gguf/pruned-Q4_K_M.gguf"
    llm = Llama(model_path=path, n_ctx=2048, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Name three rivers in Europe."}], max_tokens=64, temperature=0.0
    )
    print(reply["choices"][0]["message"]["content"])
    print("removed layers:", llm.metadata.get("general.description"))


if __name__ == "__main__":
    main()
