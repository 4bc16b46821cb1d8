"""Causal LM -> onnxruntime-genai model (genai_config.json, model.onnx + model.onnx.data, tokenizer), made
by onnxruntime-genai's own model builder (onnxruntime_genai.models.builder).

The builder does the conversion; this module runs it on the model's Hugging Face directory and checks
what it wrote: onnxruntime-genai's greedy continuation of the fixed prompts against PyTorch's in float32
(required to be identical for fp32), and every pruned zero in the graph's weights (int4 weights are
dequantized from the builder's MatMulNBits blocks first).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.verify import ExportCheckFailed, file_digests, release_memory, torch_greedy
from wanda_serve.artifacts import atomic_output_dir, package_version, package_versions
from wanda_serve.contract import GREEDY_TOKENS, MANIFEST_NAME, PROMPTS
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.models import load_model, save_model

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "fp16", "fp32")
PROVIDERS = ("cpu", "cuda")
# What the builder makes, of these: fp32 and int4 for the CPU, all three for CUDA (its own list). It does
# write an fp16 CPU graph, but onnxruntime fails running it (0.18.0: a buffer shape error on a 22-token prompt).
UNSUPPORTED = {("fp16", "cpu"): "onnxruntime-genai's model builder makes fp16 models for CUDA only: "
                                "use --execution-provider cuda, or --precision fp32 or int4 for the CPU"}
INSTALL = "pip install 'wanda-serve[onnx]' (or: pip install onnxruntime-genai)"
# The builder's extra options. hf_token=false: the input is a local directory, so no hub credentials are
# looked up. int4: symmetric quantization, the builder's default, named so that the export does not change
# if the default does: without zero points a weight of 0 is stored as the code 2^(bits-1), which
# dequantizes to exactly 0, so every pruned weight stays pruned.
BUILDER_OPTIONS = {"hf_token": "false"}
PRECISION_OPTIONS = {"int4": {"is_symmetric": "true"}}
# int4 quality settings, in the builder's words. accuracy_level: what MatMulNBits computes in, the
# activations quantized to int8 (4, the builder's CPU default) or kept in a float type. int8 layers:
# MatMuls kept at 8 bits (symmetric too, so zeros stay exact): llama.cpp's "mixed" choice of sensitive
# block layers, or the lm_head. The builder (0.18.0) writes an invalid graph for an int8 lm_head tied to
# the embeddings (their shared GatherBlockQuantized input is missing), so that one is refused.
ACCURACY_LEVELS = {1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
INT8_LAYERS = {"none": None, "mixed": "mixed_layers:int8", "last": "last_matmul:int8"}
# Where the builder keeps each block projection's weight, the projection named as in the Hugging Face
# model: a float initializer model.layers.{i}.{attn|mlp}.{projection}[.MatMul].weight, (in, out), or for
# int4 the packed weight of the MatMulNBits node /model/layers.{i}/{attn|mlp}/{projection}/MatMul_Q4.
# Some projections it fuses into one weight, their columns in this order.
FLOAT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.\w+\.(\w+)(?:\.MatMul)?\.weight$")
NBITS_NODE = re.compile(r"^/model/layers\.(\d+)/\w+/(\w+)/MatMul")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class OrtGenaiExport:
    out: Path
    model: str | None = None  # None: the embedded default model
    precision: str = "int4"
    execution_provider: str = "cpu"
    accuracy_level: int | None = None  # int4 only; None: the builder's default for the provider
    int8_layers: str = "none"  # int4 only
    overwrite: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise WandaServeError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.execution_provider not in PROVIDERS:
            raise WandaServeError(f"unknown execution provider {self.execution_provider!r}; choose from {', '.join(PROVIDERS)}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise WandaServeError(f"unknown --accuracy-level {self.accuracy_level}; choose from {', '.join(map(str, ACCURACY_LEVELS))}")
        if self.int8_layers not in INT8_LAYERS:
            raise WandaServeError(f"unknown --int8-layers {self.int8_layers!r}; choose from {', '.join(INT8_LAYERS)}")
        if self.precision != "int4" and (self.accuracy_level is not None or self.int8_layers != "none"):
            raise WandaServeError(f"--accuracy-level and --int8-layers set how int4 weights are quantized; --precision is {self.precision}")
        if (self.precision, self.execution_provider) in UNSUPPORTED:
            raise WandaServeError(UNSUPPORTED[(self.precision, self.execution_provider)])


def require_ort_genai():
    """The onnxruntime_genai module, or one line saying what to install."""
    try:
        import onnx  # noqa: F401  (reads the graph's weights)
        import onnx_ir  # noqa: F401  (the builder writes with it)
        import onnxruntime_genai
    except ImportError as e:
        raise WandaServeError(f"export ort-genai needs onnxruntime-genai, onnx and onnx_ir ({e.name or e} is missing): {INSTALL}") from e
    return onnxruntime_genai


@dataclass
class GreedyReference:
    """PyTorch's answers in float32: each prompt's greedy continuation, and the log-probabilities behind each step."""

    prompt_ids: list[list[int]]
    greedy: list[list[int]]
    log_probs: list[np.ndarray]  # per prompt (GREEDY_TOKENS, V): step i predicts greedy[i]

    @classmethod
    @torch.no_grad()
    def of(cls, model, tokenizer) -> GreedyReference:
        greedy = torch_greedy(model, tokenizer, new_tokens=GREEDY_TOKENS)
        prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
        log_probs = []
        for ids, tokens in zip(prompt_ids, greedy):
            sequence = torch.tensor([ids + tokens[:-1]])  # (1, T + G - 1): one pass gives every step's distribution
            logits = model(input_ids=sequence, use_cache=False).logits[0, len(ids) - 1:].float()  # (G, V)
            log_probs.append(torch.log_softmax(logits, dim=-1).numpy())
        return cls(prompt_ids, greedy, log_probs)


@dataclass
class PrunedPositions:
    """One linear layer's zeros as the graph holds its weight, (in, out), bit-packed."""

    bits: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> PrunedPositions:
        mask = (linear.weight.detach() == 0).numpy().T  # (in, out)
        return cls(np.packbits(mask), mask.shape)

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.shape[0] * self.shape[1]).reshape(self.shape).astype(bool)


def source_zeros(model) -> dict[str, PrunedPositions]:
    """Each block linear's zeros, by block_linears name ('0.self_attn.q_proj')."""
    return {name: PrunedPositions.of(linear) for name, linear in block_linears(model).items()}


def builder_options(job: OrtGenaiExport) -> dict[str, str]:
    """The builder's extra options for an export."""
    options = {**BUILDER_OPTIONS, **PRECISION_OPTIONS.get(job.precision, {})}
    if job.accuracy_level is not None:
        options["accuracy_level"] = str(job.accuracy_level)
    if INT8_LAYERS[job.int8_layers]:
        options["matmul_mixed_precision"] = INT8_LAYERS[job.int8_layers]
    return options


def run_builder(source: Path, out: Path, cache: Path, precision: str, provider: str, options: dict[str, str], label: str) -> None:
    """onnxruntime-genai's model builder on a Hugging Face directory, with the extra options.

    Its printed progress is kept out of the terminal (logged at debug level). What it refuses, an
    architecture it does not convert above all, becomes one line.
    """
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    printed = io.StringIO()
    root_level = logging.getLogger().level  # onnxruntime's quantizer resets the root logger to INFO
    try:
        with redirect_stdout(printed), redirect_stderr(printed):
            extra = parse_extra_options(None, str(source), str(out), precision, provider, str(cache),
                                        [f"{key}={value}" for key, value in options.items()])
            create_model(None, str(source), str(out), precision, provider, str(cache), **extra)
    except NotImplementedError as e:
        raise WandaServeError(f"onnxruntime-genai's model builder ({package_version('onnxruntime-genai')}) cannot convert {label}: "
                              f"{_first_line(e)}") from e
    except ValueError as e:
        raise WandaServeError(f"onnxruntime-genai's model builder refused {label}: {_first_line(e)}") from e
    finally:
        logging.getLogger().setLevel(root_level)
        log.debug("model builder output:\n%s", printed.getvalue())


def projection_weights(graph) -> dict[tuple[int, str], object]:
    """The graph's block projection weights, by (block index, projection name): float initializers
    (TensorProto) and MatMulNBits nodes (NodeProto)."""
    weights = {}
    for tensor in graph.initializer:
        match = FLOAT_WEIGHT.match(tensor.name)
        if match and len(tensor.dims) == 2:
            weights[(int(match[1]), match[2])] = tensor
    for node in nbits_nodes(graph):
        match = NBITS_NODE.match(node.name)
        if match:
            weights[(int(match[1]), match[2])] = node
    return weights


def nbits_nodes(graph) -> list:
    return [node for node in graph.node if node.op_type == "MatMulNBits"]


def locate(weights: dict, block: int, projection: str, widths: dict[str, int]) -> tuple[object, int] | None:
    """The weight holding one projection and the column its output starts at; None if there is none."""
    if (block, projection) in weights:
        return weights[(block, projection)], 0
    for fused, parts in FUSED.items():
        if projection in parts and (block, fused) in weights and all(p in widths for p in parts):
            return weights[(block, fused)], sum(widths[p] for p in parts[:parts.index(projection)])
    return None


def read_initializer(tensor, directory: Path) -> np.ndarray:
    """One initializer's values, from the external data file when it has one; the proto lets go of them after."""
    from onnx import external_data_helper, numpy_helper

    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(directory))
    values = numpy_helper.to_array(tensor)
    tensor.ClearField("raw_data")
    return values


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows of packed codes (rows, bytes) -> (rows, bytes * 8 / bits), lowest bits first, as MatMulNBits packs them."""
    if bits == 8:
        return packed
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                     k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """A MatMulNBits weight as floats, (K, N): (code - zero point) * scale per block of block_size inputs.

    packed: uint8 (N, blocks, block_size * bits / 8); scales: (N * blocks) or (N, blocks); zero_points:
    uint8, packed like the codes, one padded row per output, or None for the default 2^(bits-1).
    """
    blocks = -(-k // block_size)
    codes = unpack_codes(packed.reshape(n, -1), bits)[:, :blocks * block_size].reshape(n, blocks, block_size)
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zero = unpack_codes(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    else:
        raise ExportCheckFailed(f"export check failed: MatMulNBits zero points of type {zero_points.dtype} are not read here")
    values = (codes.astype(np.float32) - zero[..., None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return values.reshape(n, -1)[:, :k].T


def weight_values(weight, initializers: dict, directory: Path) -> np.ndarray:
    """A projection weight (from projection_weights) as the runtime multiplies by it, (K, N)."""
    import onnx

    if isinstance(weight, onnx.TensorProto):
        return read_initializer(weight, directory)
    node = weight
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * 5
    if inputs[4]:
        raise ExportCheckFailed(f"export check failed: {node.name} has a g_idx input, which is not read here")
    zero_points = read_initializer(initializers[inputs[3]], directory) if inputs[3] else None
    return dequantize_nbits(read_initializer(initializers[inputs[1]], directory), read_initializer(initializers[inputs[2]], directory),
                            zero_points, attributes["K"], attributes["N"], attributes.get("bits", 4), attributes["block_size"])


def check_zeros(graph_path: Path, zeros: dict[str, PrunedPositions]) -> dict:
    """Every pruned weight (from source_zeros), position by position, in the builder's graph; int4 weights
    dequantized. Counts the pruned positions that are no longer exactly zero."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    weights = projection_weights(graph)
    widths: dict[str, dict[str, int]] = {}
    for name, pruned in zeros.items():
        block, _, path = name.partition(".")
        widths.setdefault(block, {})[path.rsplit(".", 1)[-1]] = pruned.shape[1]
    placed: dict[str, list[tuple[str, int]]] = {}
    missing = []
    for name in zeros:
        block, _, path = name.partition(".")
        where = locate(weights, int(block), path.rsplit(".", 1)[-1], widths[block])
        if where is None:
            missing.append(name)
        else:
            placed.setdefault(where[0].name, []).append((name, where[1]))
    if missing:
        raise ExportCheckFailed(f"export check failed: the weights of {', '.join(missing[:3])} are not found in the "
                                f"builder's graph {graph_path.name}, so their zeros cannot be checked")
    by_name = {weight.name: weight for weight in weights.values()}
    layers = {}
    for weight_name, linears in placed.items():
        weight = weight_values(by_name[weight_name], initializers, graph_path.parent)  # (K, N), one at a time
        for name, column in linears:
            pruned = zeros[name]
            exported = weight[:, column:column + pruned.shape[1]]
            if exported.shape != pruned.shape:
                raise ExportCheckFailed(f"export check failed: {name} is {pruned.shape} (in, out) in PyTorch but "
                                        f"{exported.shape} in the graph's {weight_name}")
            mask = pruned.mask()
            layers[name] = {"source_zeros": int(mask.sum()), "pruned_not_zero": int((exported[mask] != 0).sum()),
                            "exported_zeros": int((exported == 0).sum())}
    layers = {name: layers[name] for name in zeros}
    not_zero = sum(layer["pruned_not_zero"] for layer in layers.values())
    return {
        "kept": not_zero == 0,
        "source_zeros": sum(layer["source_zeros"] for layer in layers.values()),
        "pruned_not_zero": not_zero,  # pruned positions whose exported (dequantized) weight is not exactly 0
        "exported_zeros": sum(layer["exported_zeros"] for layer in layers.values()),
        "layers": layers,
    }


def quantization_of(graph_path: Path) -> dict | None:
    """How the builder quantized its MatMuls (MatMulNBits attributes, the lm_head's included), or None if it did not."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    seen = set()
    for node in nbits_nodes(graph):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        seen.add((attributes.get("bits", 4), attributes["block_size"], attributes.get("accuracy_level", 0),
                  len(node.input) > 3 and bool(node.input[3])))
    if not seen:
        return None
    return {"op": "MatMulNBits", "schemes": [{"bits": bits, "block_size": block, "accuracy_level": level,
                                              "zero_points": zero_points} for bits, block, level, zero_points in sorted(seen)]}


def load_genai(directory: Path, provider: str):
    """The export as onnxruntime-genai loads it, on its provider when onnxruntime-genai has it here, else on
    the CPU; returns (model, provider it runs on, note)."""
    og = require_ort_genai()
    config = og.Config(str(directory))
    note = None
    if provider == "cuda" and og.is_cuda_available():
        ran_on = "cuda"
    else:
        config.clear_providers()
        ran_on = "cpu"
        if provider == "cuda":
            note = ("this onnxruntime-genai has no CUDA, so the CUDA export was checked on the CPU "
                    "(pip install onnxruntime-genai-cuda on a GPU machine to check it there)")
    try:
        return og.Model(config), ran_on, note
    except RuntimeError as e:
        raise ExportCheckFailed(f"export check failed: onnxruntime-genai cannot load the export: {_first_line(e)}") from e


def genai_greedy(model, prompt_ids: list[int], reference_log_probs: np.ndarray, reference_tokens: list[int]) -> dict:
    """One prompt's greedy continuation on onnxruntime-genai, through its KV cache, against PyTorch's.

    Each step takes the argmax of onnxruntime-genai's logits and appends it; its own search would stop at
    end-of-sequence, which PyTorch's reference neither stops at nor masks. The log-probability gap is
    measured while both continuations agree (up to and including the first step where they differ).
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + GREEDY_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    tokens, gap, diverged = [], 0.0, None
    for step in range(GREEDY_TOKENS):
        logits = generator.get_logits()[0, -1].astype(np.float64)  # (V,)
        token = int(logits.argmax())
        if diverged is None:
            log_probs = logits - logits.max()
            log_probs -= np.log(np.exp(log_probs).sum())
            gap = max(gap, float(np.abs(log_probs - reference_log_probs[step]).max()))
            if token != reference_tokens[step]:
                diverged = step
        tokens.append(token)
        if step + 1 < GREEDY_TOKENS:
            generator.append_tokens([[token]])
    return {"tokens": tokens, "equal": diverged is None, "first_divergence": diverged, "max_log_prob_gap": gap}


def compare_with_torch(model, reference: GreedyReference) -> dict:
    try:
        prompts = [{"prompt": prompt, **genai_greedy(model, ids, log_probs, tokens)}
                   for prompt, ids, log_probs, tokens in zip(PROMPTS, reference.prompt_ids, reference.log_probs, reference.greedy)]
    except RuntimeError as e:  # onnxruntime's errors while running the graph
        raise ExportCheckFailed(f"export check failed: onnxruntime-genai cannot run the export: {_first_line(e)}") from e
    return {
        "tokens": GREEDY_TOKENS,
        "greedy_equal": all(p["equal"] for p in prompts),
        "greedy_tokens_agreeing": [GREEDY_TOKENS if p["equal"] else p["first_divergence"] for p in prompts],
        "max_log_prob_gap": max(p["max_log_prob_gap"] for p in prompts),
        "prompts": prompts,
    }


def tokenizer_agreement(model, reference: GreedyReference) -> list:
    """Whether onnxruntime-genai's tokenizer encodes each prompt to the ids transformers' does (the check
    itself feeds transformers' ids); its error, if it cannot load the tokenizer."""
    import onnxruntime_genai as og

    try:
        tokenizer = og.Tokenizer(model)
        return [tokenizer.encode(prompt).tolist() == ids for prompt, ids in zip(PROMPTS, reference.prompt_ids)]
    except RuntimeError as e:
        return [f"onnxruntime-genai's tokenizer failed: {_first_line(e)}"]


def export_ort_genai(job: OrtGenaiExport) -> dict:
    """Write job.model with onnxruntime-genai's model builder, verified on onnxruntime-genai."""
    og = require_ort_genai()
    with atomic_output_dir(job.out, job.overwrite) as tmp:
        loaded = load_model(job.model, "float32")  # the reference, and the check that MODEL is a causal LM
        source, location = loaded.source, Path(loaded.location)
        config = loaded.model.config
        architecture = (config.architectures or [type(loaded.model).__name__])[0]
        if job.int8_layers == "last" and config.tie_word_embeddings:
            raise WandaServeError(f"--int8-layers last: {source}'s lm_head is tied to its embeddings, and onnxruntime-genai's "
                                  f"model builder ({package_version('onnxruntime-genai')}) writes an invalid graph for a tied "
                                  "int8 lm_head; use --int8-layers mixed or none")
        zeros_before = source_zeros(loaded.model)
        reference = GreedyReference.of(loaded.model, loaded.tokenizer)
        with tempfile.TemporaryDirectory(prefix=".builder-", dir=tmp) as scratch:
            builder_input = location
            if not (location.is_dir() and config.architectures):
                # a .gguf file, a hub id, or a config without the architecture the builder dispatches on
                builder_input = Path(scratch) / "source"
                save_model(loaded, builder_input)
            del loaded
            release_memory()
            started = time.perf_counter()
            options = builder_options(job)
            run_builder(builder_input, tmp, Path(scratch) / "cache", job.precision, job.execution_provider, options,
                        f"{source} ({architecture})")
            export_seconds = time.perf_counter() - started
        genai_config = json.loads((tmp / "genai_config.json").read_text())
        graph_path = tmp / genai_config["model"]["decoder"]["filename"]

        zeros = check_zeros(graph_path, zeros_before)
        if not zeros["kept"] and job.precision != "int4":
            raise ExportCheckFailed(f"export check failed: {zeros['pruned_not_zero']} pruned weights are not zero in the "
                                    f"{job.precision} graph's initializers")
        model, ran_on, note = load_genai(tmp, job.execution_provider)
        check, same_ids = compare_with_torch(model, reference), tokenizer_agreement(model, reference)
        del model
        if job.precision == "fp32" and not check["greedy_equal"]:
            raise ExportCheckFailed(
                "export check failed: onnxruntime-genai's greedy continuation differs from PyTorch's (tokens agreeing per prompt: "
                f"{check['greedy_tokens_agreeing']} of {GREEDY_TOKENS}; max log-prob gap {check['max_log_prob_gap']:.2g})"
            )
        manifest = {
            "format": "onnxruntime-genai model (genai_config.json, ONNX decoder with KV cache), made by onnxruntime-genai's model builder",
            "source": source,
            "architecture": architecture,
            "builder": {"package": "onnxruntime-genai", "version": package_version("onnxruntime-genai"), "precision": job.precision,
                        "execution_provider": job.execution_provider, "extra_options": options,
                        "model_type": genai_config["model"].get("type")},
            "export_seconds": export_seconds,
            "quantization": quantization_of(graph_path),
            "zeros": {**zeros, "weights": "MatMulNBits weights, dequantized" if job.precision == "int4" else f"{job.precision} initializers"},
            "checks": {
                "runtime": f"onnxruntime-genai {og.__version__}",
                "provider": ran_on,
                **({"note": note} if note else {}),
                "pytorch_reference": {"dtype": "float32", "greedy": reference.greedy},
                "greedy_must_equal": job.precision == "fp32",  # else nothing is written; fp16 and int4 are reported
                "greedy": check,
                "genai_tokenizer_same_ids": same_ids,
            },
            "files": file_digests(tmp),
            "versions": {**package_versions(), **{name: package_version(name) for name in ("onnxruntime-genai", "onnxruntime", "onnx")}},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
