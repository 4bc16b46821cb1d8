"""Causal LM -> one GGUF file that llama.cpp (and ollama, LM Studio) loads, verified by reading it back.

The layout is llama.cpp's own, taken from the `gguf` package wherever it holds it: tensor names from
`gguf.get_tensor_name_map` (TensorNameMap), metadata keys from `gguf.GGUFWriter`'s `add_*` methods,
merges and special tokens from `gguf.SpecialVocab`, values from `gguf.quants.quantize`. What only
llama.cpp's `convert_hf_to_gguf.py` holds (it is not in the package) is followed here and named where
it is used: its choice of tensor types (`ModelBase.prepare_tensors`), its metadata (`TextModel.
set_gguf_parameters`, `LlamaModel.set_gguf_parameters`), its token list (`TextModel.get_vocab_base`)
and `LlamaModel.permute`, the reordering of q/k rows that llama.cpp's rotary embedding expects.

The file is written tensor by tensor with the writer's streaming calls, each model weight released
once written, so the model and the file are never both whole in memory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import torch

from exporters.gguf_vocab import Vocabulary, read_vocabulary
from exporters.verify import (
    ExportCheckFailed, file_sha256, prompt_batch, release_memory, tokens_agreeing, torch_greedy, torch_logits,
)
from wanda_serve.artifacts import atomic_files, check_output_file, package_versions
from wanda_serve.contract import GREEDY_TOKENS, PROMPTS
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.models import load_model

MANIFEST_SUFFIX = ".manifest.json"  # FILE.gguf -> FILE.gguf.manifest.json beside it


@dataclass(frozen=True)
class GgufType:
    tensor_type: gguf.GGMLQuantizationType  # of every 2-D weight; 1-D tensors and norms stay F32
    file_type: gguf.LlamaFileType  # general.file_type, as llama.cpp names the mix
    exact_zeros: bool  # a 0 weight is stored as exactly 0: the pruned zeros are checked, not just counted
    # token_embd and output (one matrix when tied), if not in tensor_type: llama.cpp's quantize keeps
    # the output matrix at more bits than a 4-bit mix's weights (Q6_K, which gguf cannot write).
    embedding_type: gguf.GGMLQuantizationType | None = None


TYPES = {
    "f16": GgufType(gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, exact_zeros=True),
    "bf16": GgufType(gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16, exact_zeros=True),
    # Blocks of 32 values, one f16 scale each, round(x / scale): 0 stays 0.
    "q8_0": GgufType(gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, exact_zeros=True),
    # Blocks of 32 values, one f16 scale d = (the value of largest |x|) / -8 each, 4 bits trunc(x / d + 8.5)
    # read back as (q - 8) * d: 0 stays 0. llama.cpp's plainest 4-bit type.
    "q4_0": GgufType(gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0, exact_zeros=True,
                     embedding_type=gguf.GGMLQuantizationType.Q8_0),
    # Blocks with a scale and a minimum each: 0 becomes min + k * scale, rarely exactly 0.
    "q4_k": GgufType(gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S, exact_zeros=False),
}
# Each tensor read back against the source's (check_weights): max |difference of the fingerprints| as
# a share of the largest. Rounding to the type moves a weight by at most its relative precision: F32 0
# (stored as is), F16 2^-11, BF16 2^-8, Q8_0 1/254 of its block's largest |value| (round(x / d), d =
# max / 127), Q4_0 1/16 of it, Q4_K about 1/30 of its block's range; these limits are 2 to 5 times
# that (measured on the test models: F16 3e-4, BF16 2.5e-3, Q8_0 7e-3, Q4_0 0.12; on SmolLM2-135M,
# Q4_0 0.21 dense, 0.15 pruned). A tensor with rows or columns in the wrong place (a missing or wrong
# q/k permutation, a misnamed tensor) is off by about its own size, a share near 1, whatever the model.
WEIGHTS_TOLERANCE = {
    gguf.GGMLQuantizationType.F32: 1e-6,
    gguf.GGMLQuantizationType.F16: 2e-3,
    gguf.GGMLQuantizationType.BF16: 1e-2,
    gguf.GGMLQuantizationType.Q8_0: 2e-2,
    gguf.GGMLQuantizationType.Q4_0: 0.4,
    gguf.GGMLQuantizationType.Q4_K: 0.1,
}
# Max |read-back logit - source logit| over the fixed prompts (real positions), as a share of the
# source's largest |logit|; both in float32, so the difference is what the type's rounding does to the
# whole model. Measured on the tiny test models (2 layers, pruned 2:4, attention sharpened as in the
# tests): f16 0.06 %, bf16 0.4 %, q8_0 1.0 %; with attention 2.5 times sharper still, 0.3 %, 2.3 % and
# 5.7 %. The same models written without the q/k permutation gave 40 % and 78 %. The limits sit 2x to
# 15x above rounding and well below layout errors; on an almost uniform attention (random init) a
# layout error can hide in the logits (0.5 %), which is why the weights check above exists.
# None: reported, not required. 4-bit rounding alone moves the logits as far as a layout error does
# (q4_0: 10-17 % on the test models, 59 % dense and 74 % pruned on SmolLM2-135M), so only the weights
# check tells them apart.
LOGITS_TOLERANCE = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.1, "q4_0": None, "q4_k": None}


def logits_tolerance_text(tolerance: float | None) -> str:
    """A logits tolerance as summary lines show it."""
    return "reported, not required" if tolerance is None else f"tolerance {tolerance:.0%}"


# Beyond the fixed prompts, text that tells pre-tokenizers apart: digits, runs of spaces and newlines,
# contractions, punctuation, non-Latin scripts.
TOKENIZER_CHECK_TEXT = "Hello  world!\n\n 3 33 333 3333 3.14 I'm sure they'll   go\t\tthere... über 日本語 ok?"


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    rope_permute: bool  # llama.cpp's LlamaModel reorders q/k rows (llama_rope_permute); Qwen2Model does not


# By Hugging Face model_type, as llama.cpp's converter maps them (MistralForCausalLM is its LlamaModel)
# and transformers' GGUF loader reads them back.
ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, rope_permute=False),
}


@dataclass
class GgufExport:
    out: Path  # FILE.gguf; the manifest goes beside it
    model: str | None = None  # None: the embedded default model
    type: str = "f16"
    overwrite: bool = False


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def check_job(job: GgufExport) -> GgufType:
    """Everything about the job that can be refused before the model loads."""
    if job.type not in TYPES:
        raise WandaServeError(f"unknown GGUF type {job.type!r} for --type; choose from {', '.join(writable_types())}")
    if job.type not in writable_types():
        raise WandaServeError(
            f"--type {job.type}: the installed gguf package {gguf_version()} can read {job.type} but not write it "
            f"(gguf.quants has no {TYPES[job.type].tensor_type.name} quantizer); types that work: {', '.join(writable_types())}"
        )
    if job.out.suffix != ".gguf":
        raise WandaServeError(f"--out {job.out} must end in .gguf (one file; its manifest goes beside it)")
    check_output_file(job.out, job.overwrite, "--out")
    check_output_file(manifest_path(job.out), job.overwrite, "manifest")
    return TYPES[job.type]


def writable_types() -> list[str]:
    """The types the installed gguf package can quantize to (it dequantizes more than it quantizes)."""
    return [name for name, kind in TYPES.items() if _can_quantize(kind.tensor_type)]


def _can_quantize(tensor_type: gguf.GGMLQuantizationType) -> bool:
    block, _ = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), tensor_type)
    except NotImplementedError:
        return False
    return True


def gguf_version() -> str:
    return metadata.version("gguf")


def model_architecture(config) -> Architecture:
    """The GGUF architecture for this config, or why this exporter cannot write it."""
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise WandaServeError(
            f"GGUF export does not support the architecture {config.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise WandaServeError(
            f"GGUF export supports plain rotary embeddings only, not rope type {rope.get('rope_type', rope.get('type'))!r} "
            "(transformers' GGUF reader cannot restore it, so the export could not be verified)"
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window:
        raise WandaServeError(
            f"GGUF export of {config.model_type} with sliding-window attention (window {window}) is not supported: "
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[architecture.arch]} architecture attends to the whole context"
        )
    if architecture.rope_permute and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise WandaServeError(
            f"GGUF export of {config.model_type} with attention or MLP biases is not supported "
            "(transformers' GGUF reader does not restore them, so the export could not be verified)"
        )
    return architecture


def llama_rope_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), unchanged.

    Hugging Face's LLaMA rotates the two halves of each head (rotate_half: dim i pairs with dim
    i + d/2); llama.cpp's LLAMA rope rotates adjacent pairs (2i, 2i+1). Each head's rows go from
    [first half, second half] to interleaved: within a head, (2, d/2) is transposed to (d/2, 2). q has
    n_head heads, k has n_head_kv. transformers' GGUF loader undoes it (LlamaTensorProcessor).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@dataclass
class PlannedTensor:
    source: str  # the model's parameter name
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # (out, in) as PyTorch holds it; GGUF stores the dimensions reversed
    tensor_type: gguf.GGMLQuantizationType
    heads: tuple[int, int | None] | None = None  # (n_head, n_head_kv) for llama_rope_permute

    @property
    def nbytes(self) -> int:
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.tensor_type))


def plan_tensors(model, architecture: Architecture, kind: GgufType) -> list[PlannedTensor]:
    """Every tensor of the file: its GGUF name, type and permutation, in the order it is written.

    Names come from gguf's TensorNameMap; a parameter it does not know stops the export. Types follow
    convert_hf_to_gguf.py (ModelBase.prepare_tensors): 1-D tensors and norms in F32, a weight whose
    rows do not fill the type's blocks in F16, everything else in the chosen type, embeddings and
    output included unless the type names another for them. A tied lm_head is not written: llama.cpp
    reuses token_embd, as transformers does.
    """
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    n_head, n_head_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    seen, planned = set(), []
    for source, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights: written once, under the first name
            continue
        seen.add(tensor.data_ptr())
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WandaServeError(f"GGUF export: {config.model_type} tensor {source!r} has no llama.cpp name in gguf's tensor map")
        tensor_type = kind.tensor_type
        if kind.embedding_type is not None and name in ("token_embd.weight", "output.weight"):
            tensor_type = kind.embedding_type
        if tensor.ndim <= 1 or name.endswith("_norm.weight"):
            tensor_type = gguf.GGMLQuantizationType.F32
        elif tensor.shape[-1] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
            tensor_type = gguf.GGMLQuantizationType.F16
        heads = None
        if architecture.rope_permute and source.endswith(("q_proj.weight", "q_proj.bias")):
            heads = (n_head, n_head)
        elif architecture.rope_permute and source.endswith(("k_proj.weight", "k_proj.bias")):
            heads = (n_head, n_head_kv)
        planned.append(PlannedTensor(source, name, tuple(tensor.shape), tensor_type, heads))
    return planned


def add_model_metadata(writer: gguf.GGUFWriter, config, architecture: Architecture, kind: GgufType, name: str) -> None:
    """The hyperparameters, as convert_hf_to_gguf.py's TextModel.set_gguf_parameters writes them for a
    dense decoder (LlamaModel adds the vocabulary size and the rope dimension count)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = config.to_dict().get("head_dim")
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if architecture.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim or config.hidden_size // config.num_attention_heads)
    writer.add_file_type(kind.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model, path: Path, planned: list[PlannedTensor], architecture: Architecture, kind: GgufType,
               vocabulary: Vocabulary, name: str) -> None:
    """Write the file: header, metadata, tensor table, then each tensor, converted as it is written.

    The model is used up: each parameter is released once its tensor is in the file.
    """
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[architecture.arch])
    try:
        add_model_metadata(writer, model.config, architecture, kind, name)
        vocabulary.add_to(writer)
        for tensor in planned:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in planned:
            param = model.get_parameter(tensor.source)
            data = param.detach().float()
            if tensor.heads is not None:
                data = llama_rope_permute(data, *tensor.heads)
            writer.write_tensor_data(gguf.quants.quantize(data.contiguous().numpy(), tensor.tensor_type))
            param.data = torch.empty(0, dtype=param.dtype)
    finally:
        writer.close()


def weight_sketches(model, planned: list[PlannedTensor]) -> dict[str, np.ndarray]:
    """A fingerprint of each written tensor: a 2-D weight times a fixed random +-1 vector (one value per
    row), a 1-D tensor as it is. A row or column in the wrong place changes it by about its own size,
    the type's rounding only by about the weights' relative error."""
    sketches = {}
    for tensor in planned:
        weight = model.get_parameter(tensor.source).detach().float()
        sketches[tensor.source] = (weight @ _signs(weight.shape[-1]) if weight.ndim == 2 else weight).numpy()
    return sketches


def _signs(length: int) -> torch.Tensor:
    return torch.randint(0, 2, (length,), generator=torch.Generator().manual_seed(length)).float() * 2 - 1


def check_weights(model, reference: dict[str, np.ndarray], planned: list[PlannedTensor]) -> dict:
    """Each tensor of the model read back against the source's fingerprint, within its type's rounding."""
    read_back = weight_sketches(model, planned)
    worst: dict[str, float] = {}
    failing = []
    for tensor in planned:
        before, after = reference[tensor.source], read_back[tensor.source]
        scale = float(np.abs(before).max())
        difference = float(np.abs(after - before).max()) / (scale if scale > 0 else 1.0)
        kind = tensor.tensor_type.name
        worst[kind] = max(worst.get(kind, 0.0), difference)
        if not difference <= WEIGHTS_TOLERANCE[tensor.tensor_type]:
            failing.append(f"{tensor.source} ({tensor.name}, {kind}): {difference:.2g}")
    return {"passed": not failing, "max_relative_diff_by_type": worst, "failing": failing}


def zero_masks(model) -> dict[str, np.ndarray]:
    """Each block linear's exact zeros, bit-packed (1 bit per weight), by 'block index.layer name'."""
    return {name: np.packbits((linear.weight.detach() == 0).numpy().ravel()) for name, linear in block_linears(model).items()}


def check_zeros(model, masks: dict[str, np.ndarray]) -> dict:
    """Whether every weight that is 0 in the source is exactly 0 in `model`, layer by layer."""
    linears = block_linears(model)
    source = kept = extra = 0
    lost_layers = []
    for name, bits in masks.items():
        weight = linears[name].weight.detach()
        zero_before = np.unpackbits(bits, count=weight.numel()).astype(bool)
        zero_after = (weight == 0).numpy().ravel()
        source += int(zero_before.sum())
        kept += int((zero_before & zero_after).sum())
        extra += int((zero_after & ~zero_before).sum())
        if (zero_before & ~zero_after).any():
            lost_layers.append(name)
    return {"kept": kept == source, "source_zeros": source, "zeros_kept": kept, "zeros_lost": source - kept,
            "new_zeros": extra, "layers_losing_zeros": lost_layers}


@dataclass
class SourceReference:
    """What the source model answers, taken before the export uses its weights up."""

    batch: dict[str, torch.Tensor]  # the fixed prompts, left-padded
    logits: np.ndarray  # (B, T, V), float32
    greedy: list[list[int]]
    zeros: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]  # weight_sketches
    token_ids: list[list[int]]  # the prompts and TOKENIZER_CHECK_TEXT, tokenized, without <unk>
    unknown_tokens: int  # <unk>s the source's tokenizer gave on those texts

    @classmethod
    def of(cls, model, tokenizer, planned: list[PlannedTensor]) -> SourceReference:
        batch = prompt_batch(tokenizer)
        # A character outside a byte-level vocabulary's alphabet is <unk> to transformers' tokenizer, while
        # llama.cpp (and transformers' GGUF reader) drop it; everything around it tokenizes the same.
        with_unknown = tokenize_checks(tokenizer)
        token_ids = [[i for i in ids if i != tokenizer.unk_token_id] for ids in with_unknown]
        return cls(batch, torch_logits(model, batch).numpy(), torch_greedy(model, tokenizer, new_tokens=GREEDY_TOKENS),
                   zero_masks(model), weight_sketches(model, planned), token_ids, sum(map(len, with_unknown)) - sum(map(len, token_ids)))


def tokenize_checks(tokenizer) -> list[list[int]]:
    """The check texts' token ids, without BOS/EOS (whether those are added is metadata, written from the source)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (*PROMPTS, TOKENIZER_CHECK_TEXT)]


def compare(model, tokenizer, reference: SourceReference, source_tokenizer) -> dict:
    """The read-back model and tokenizer against the source: logits, greedy continuations, token ids."""
    logits = torch_logits(model, reference.batch).numpy()
    real = reference.batch["attention_mask"].numpy().astype(bool)  # padded positions are never read
    difference = float(np.abs(logits - reference.logits)[real].max())
    scale = float(np.abs(reference.logits)[real].max())
    greedy = torch_greedy(model, source_tokenizer, new_tokens=GREEDY_TOKENS)
    token_ids = tokenize_checks(tokenizer)
    return {
        "max_abs_logit_diff": difference,
        "max_abs_source_logit": scale,
        "relative_logit_diff": difference / scale if scale > 0 else float("inf"),
        "greedy": greedy,
        "greedy_equal": greedy == reference.greedy,
        "greedy_tokens_agreeing": tokens_agreeing(greedy, reference.greedy),
        "tokenizer_identical": token_ids == reference.token_ids,
    }


def llama_cpp_greedy(path: Path, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    """The file run by llama.cpp itself (llama-cpp-python), where it is installed: each prompt's greedy
    continuation, the argmax of llama.cpp's logits at every step, end-of-sequence neither stopping nor masked
    (as torch_greedy). llama.cpp computes in its own kernels (f16 and quantized dot products), so its tokens
    are compared, not required to agree. It is optional: it has no binary wheel (make llama-cpp builds it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"ran": False, "why": "llama-cpp-python is not installed (make llama-cpp builds it from source)"}
    context = max(map(len, prompt_ids)) + new_tokens
    # logits_all: llama-cpp-python (0.3) keeps no logits in `scores` otherwise; it samples inside llama.cpp.
    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), logits_all=True, verbose=False)
    continuations = []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        continuations.append(tokens)
    llm.close()
    return {"ran": True, "version": metadata.version("llama-cpp-python"), "greedy": continuations}


def export_gguf(job: GgufExport) -> dict:
    """Write job.model as one GGUF file plus FILE.gguf.manifest.json, verified by reading the file back
    through transformers' GGUF loader; nothing is written if a check fails."""
    kind = check_job(job)
    loaded = load_model(job.model, "float32")
    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    del loaded
    architecture = model_architecture(model.config)
    vocabulary = read_vocabulary(tokenizer, model.config)
    planned = plan_tensors(model, architecture, kind)
    reference = SourceReference.of(model, tokenizer, planned)
    hf_architecture, model_type = type(model).__name__, model.config.model_type

    # The GGUF file is renamed into place before its manifest; the temporary keeps the .gguf suffix load_model goes by.
    with atomic_files([(job.out, "--out"), (manifest_path(job.out), "manifest")], job.overwrite) as (gguf_tmp, manifest_tmp):
        started = time.perf_counter()
        write_gguf(model, gguf_tmp, planned, architecture, kind, vocabulary, Path(source).name)
        export_seconds = time.perf_counter() - started
        del model
        release_memory()

        readback = load_model(str(gguf_tmp), "float32")
        check = compare(readback.model, readback.tokenizer, reference, tokenizer)
        weights = check_weights(readback.model, reference.weights, planned)
        zeros = check_zeros(readback.model, reference.zeros)
        del readback
        tolerance = LOGITS_TOLERANCE[job.type]
        if tolerance is not None and not check["relative_logit_diff"] <= tolerance:
            raise ExportCheckFailed(
                f"export check failed: the GGUF file read back gives logits {check['max_abs_logit_diff']:.3g} away from the "
                f"source's ({check['relative_logit_diff']:.2%} of the largest, tolerance {tolerance:.0%} for {job.type})"
            )
        if not weights["passed"]:
            raise ExportCheckFailed(
                f"export check failed: {len(weights['failing'])} tensors read back from the GGUF file differ from the source's "
                f"beyond their type's rounding, first {weights['failing'][0]}"
            )
        if kind.exact_zeros and not zeros["kept"]:
            raise ExportCheckFailed(
                f"export check failed: {zeros['zeros_lost']} pruned zeros are not zero in the GGUF file read back "
                f"(layers {', '.join(zeros['layers_losing_zeros'][:3])})"
            )
        if not check["tokenizer_identical"]:
            raise ExportCheckFailed(
                f"export check failed: the tokenizer read back from the GGUF file (pre-tokenizer {vocabulary.pre!r}) "
                "tokenizes the check texts differently from the source's"
            )
        # Reported, not required, so run only on a file that passed every required check.
        llama_cpp = llama_cpp_greedy(gguf_tmp, [tokenizer(prompt)["input_ids"] for prompt in PROMPTS], GREEDY_TOKENS)
        if llama_cpp["ran"]:
            llama_cpp["tokens_agreeing"] = tokens_agreeing(llama_cpp["greedy"], reference.greedy)
        types: dict[str, int] = {}
        for tensor in planned:
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        manifest = {
            "format": "GGUF (llama.cpp, ollama, LM Studio), one file",
            "file": {"name": job.out.name, "bytes": gguf_tmp.stat().st_size, "sha256": file_sha256(gguf_tmp)},
            "source": source,
            "architecture": {"transformers": hf_architecture, "model_type": model_type,
                             "gguf": gguf.MODEL_ARCH_NAMES[architecture.arch],
                             "q_k_rope_permuted": architecture.rope_permute},
            "type": {"name": job.type, "file_type": kind.file_type.name, "tensor_types": types},
            "tokenizer": vocabulary.summary(),
            "export_seconds": export_seconds,
            "checks": {
                "reader": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...), dequantized to float32",
                "logits": {"max_abs_diff": check["max_abs_logit_diff"], "max_abs_source_logit": check["max_abs_source_logit"],
                           "relative_diff": check["relative_logit_diff"], "tolerance": tolerance,
                           "passed": True if tolerance is not None else None},
                "weights": {**weights, "tolerance_by_type": {t.name: WEIGHTS_TOLERANCE[t] for t in
                                                             {tensor.tensor_type for tensor in planned}}},
                "greedy": {"tokens": GREEDY_TOKENS, "equal": check["greedy_equal"], "read_back": check["greedy"],
                           "source": reference.greedy, "tokens_agreeing": check["greedy_tokens_agreeing"]},
                "tokenizer": {"identical": check["tokenizer_identical"], "texts": [*PROMPTS, TOKENIZER_CHECK_TEXT],
                              "source_unknown_tokens_dropped": reference.unknown_tokens},
                "zeros": {**zeros, "required": kind.exact_zeros},
                "llama_cpp": llama_cpp,
            },
            "versions": package_versions(),
        }
        manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
