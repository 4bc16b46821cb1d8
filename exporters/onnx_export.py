"""Causal LM -> one ONNX decoder graph with a KV cache, for onnxruntime on edge CPUs and GPUs.

The graph takes (input_ids, attention_mask, position_ids, past_key_values.{i}.key/value) and
returns (logits, present.{i}.key/value), with dynamic batch, sequence and past lengths. Prefill
passes a past of length 0. Weights go to external data (model.onnx + model.onnx.data), so models
above the 2 GB protobuf limit work.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from exporters.onnx_runtime import OnnxCausalLM, positions_from_mask, require_onnx
from exporters.verify import (
    ExportCheckFailed, cast_parameters, file_digests, prompt_batch, release_memory,
    tokens_agreeing, torch_greedy, torch_logits,
)
from wanda_serve.artifacts import atomic_output_dir, package_versions
from wanda_serve.contract import GREEDY_TOKENS, MANIFEST_NAME, PROMPTS, EvalOptions
from wanda_serve.data import evaluation_ids, load_corpus
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.evaluate import perplexity, torch_logits_fn
from wanda_serve.models import DTYPES, check_context, load_model

GRAPH_NAME = "model.onnx"
QUANTIZATIONS = {"int8": 8, "int4": 4}  # weight bits
# Max |onnxruntime - PyTorch| logit on the fixed prompts, both in the export's dtype.
LOGITS_TOLERANCE = {"float32": 1e-3, "float16": 5e-2}


@dataclass
class OnnxExport:
    out: Path
    model: str | None = None  # None: the embedded default model
    dtype: str = "float32"
    quantize: tuple[str, ...] = ()
    evaluation: EvalOptions | None = None  # perplexity of the export and each quantized variant
    overwrite: bool = False
    progress: bool = True


class CausalLMWithFlatCache(torch.nn.Module):
    """Flat KV tensors in and out; the cache object exists only inside forward, so torch.export never sees it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], config=self.model.config
        )
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _cache_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


class MatMulLinear(torch.nn.Module):
    """nn.Linear with its weight held transposed, (in, out), as ONNX's MatMul reads it.

    The graph then takes the weight as it is: from nn.Linear the exporter's optimizer would fold a
    transposed copy of every weight, and the export would hold the weights twice.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight_T = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = linear.bias

    def forward(self, x):
        out = torch.matmul(x, self.weight_T)
        return out if self.bias is None else out + self.bias


def transpose_linears(model) -> None:
    """Replace, in place and one at a time, every nn.Linear whose weight no other module shares (a tied
    lm_head keeps the embedding's) by a MatMulLinear."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and owners[id(module.weight)] == 1]
    for name in names:  # by name: a list of the modules would keep every replaced weight alive
        model.set_submodule(name, MatMulLinear(model.get_submodule(name)))


def export_graph(model, path: Path) -> None:
    """Trace with past length 3 (not 0 or 1, which torch.export would specialise); 0 works at run time.

    The model is used up: its linear layers become MatMulLinear (weights transposed in place, named
    '<module path>.weight_T' in the graph), so the graph shares its weights, and once the graph is
    saved its parameters are released.
    """
    config = model.config
    kv_heads, head_dim = _cache_shape(config)
    dtype = next(model.parameters()).dtype
    batch, seq, past_len = 2, 2, 3
    past = [torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * config.num_hidden_layers)]
    example = (
        torch.randint(0, config.vocab_size, (batch, seq)),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        *past,
    )
    Dim = torch.export.Dim
    B, S = Dim("batch", min=1, max=1024), Dim("sequence", min=1, max=65536)
    P, total = Dim("past_sequence", min=1, max=65536), Dim("total_sequence", min=1, max=131072)
    dynamic_shapes = ({0: B, 1: S}, {0: B, 1: total}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in past))
    inputs, outputs = _io_names(config.num_hidden_layers)
    transpose_linears(model)
    with torch.no_grad(), warnings.catch_warnings():
        # "The axis name: batch will not be used, since it shares ...": names merge, shapes stay dynamic.
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            CausalLMWithFlatCache(model).eval(), example, dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes, optimize=True, external_data=True, report=False, verbose=False,
        )
    for value in list(program.model.graph.initializers.values()):
        if value.name.endswith(".weight_T"):  # the wrapper's attribute comes first: model.<module path>.weight_T
            value.name = value.name.removeprefix("model.")
    for node in program.model.graph:
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)  # most of the .onnx file otherwise
    program.save(str(path), external_data=True)
    # The exporter's objects outlive this call (onnxscript's rewrite rules keep the last graph they
    # matched), so the weights they hold are released here: the graph's folded constants, and the
    # model's parameters, which the graph shares.
    for value in program.model.graph.initializers.values():
        value.const_value = None
    for param in model.parameters():
        param.data = torch.empty(0, dtype=param.dtype)


def source_zeros(model) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Each block linear's zeros as the graph will hold them, (in, out), bit-packed: module path -> (bits, shape)."""
    paths = {id(module): name for name, module in model.named_modules()}
    zeros = {}
    for linear in block_linears(model).values():
        mask = (linear.weight.detach() == 0).numpy().T  # (in, out)
        zeros[paths[id(linear)]] = (np.packbits(mask), mask.shape)
    return zeros


def check_zeros(graph_path: Path, zeros: dict[str, tuple[np.ndarray, tuple[int, int]]]) -> dict:
    """Every block linear's zeros (from source_zeros), position by position, in its initializer of the
    saved graph, read one initializer at a time."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    layers, missing = {}, []
    for path, (bits, shape) in zeros.items():
        tensor = initializers.get(f"{path}.weight_T")
        if tensor is None:
            missing.append(path)
            continue
        exported = _initializer_array(tensor, graph_path.parent)  # (in, out)
        source = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
        layers[path] = {"source_zeros": int(source.sum()), "exported_zeros": int((exported == 0).sum()),
                        "same_positions": exported.shape == shape and bool(np.array_equal(source, exported == 0))}
    return {"kept": not missing and all(l["same_positions"] for l in layers.values()), "missing": missing, "layers": layers}


def _initializer_array(tensor, directory: Path) -> np.ndarray:
    """One initializer's values, read from its external data file when it has one."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    where = {entry.key: entry.value for entry in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.fromfile(directory / where["location"], dtype=dtype, count=count, offset=int(where.get("offset", 0)))
    return values.reshape(tuple(tensor.dims))


def quantize_graph(source: Path, target: Path, bits: int) -> None:
    """Weight-only quantization with onnxruntime's own MatMulNBits (symmetric, blocks of 32 inputs).

    Activations stay in float: onnxruntime's quantize_dynamic would quantize them too, per tensor,
    which costs far more quality (SmolLM2: perplexity 20.8 -> 36.9 at int8, worse than int4 here).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    root_level = logging.getLogger().level  # the quantizer resets the root logger to INFO
    try:
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=None, bits=bits)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source), load_external_data=True), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=True)
    finally:
        logging.getLogger().setLevel(root_level)


@dataclass
class TorchReference:
    """What PyTorch answers, taken before the export takes over the model's weights."""

    batch: dict[str, torch.Tensor]  # the fixed prompts, left-padded
    logits: np.ndarray  # (B, T, V) on the batch
    greedy: list[list[int]]  # each prompt's greedy continuation through the KV cache

    @classmethod
    def of(cls, model, tokenizer) -> TorchReference:
        batch = prompt_batch(tokenizer)
        positions = torch.from_numpy(positions_from_mask(batch["attention_mask"].numpy()))
        logits = torch_logits(model, {**batch, "position_ids": positions}).numpy()
        return cls(batch, logits, torch_greedy(model, tokenizer, new_tokens=GREEDY_TOKENS))


def compare_with_torch(runner: OnnxCausalLM, reference: TorchReference, tokenizer) -> dict:
    mask = reference.batch["attention_mask"].numpy()
    got = runner.logits(reference.batch["input_ids"].numpy(), mask).astype(np.float32)
    real = mask.astype(bool)  # padded positions are never read
    greedy = [runner.generate(tokenizer(p)["input_ids"], GREEDY_TOKENS) for p in PROMPTS]
    return {
        "max_abs_logit_diff": float(np.abs(reference.logits - got)[real].max()),
        "greedy": greedy,
        "greedy_equal": greedy == reference.greedy,
        "greedy_tokens_agreeing": tokens_agreeing(greedy, reference.greedy),
    }


def export_onnx(job: OnnxExport) -> dict:
    """Write job.model as an ONNX decoder with KV cache (plus quantized variants), verified on onnxruntime."""
    require_onnx()
    if job.dtype not in LOGITS_TOLERANCE:
        raise WandaServeError(f"ONNX export supports float32 and float16, not {job.dtype!r}")
    for kind in job.quantize:
        if kind not in QUANTIZATIONS:
            raise WandaServeError(f"unknown quantization {kind!r}; choose from {', '.join(QUANTIZATIONS)}")
        if job.dtype != "float32":
            raise WandaServeError("weight-only quantization starts from the float32 graph: use --dtype float32")
    with atomic_output_dir(job.out, job.overwrite) as tmp:
        # One copy of the weights at a time: the model (loaded in its own dtype, cast in place), then the
        # graph that shares its weights, then onnxruntime's session, each freed before the next.
        loaded = load_model(job.model, "auto")
        model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
        del loaded
        model.set_attn_implementation("eager")  # exports to plain MatMul/Softmax that every runtime has
        # The reference is the model as exported, in its dtype: the check asks whether onnxruntime
        # computes what PyTorch computes; what fp16 costs against fp32 is what perplexity shows.
        cast_parameters(model, DTYPES[job.dtype])
        torch_reference = TorchReference.of(model, tokenizer)
        reference = {"dtype": job.dtype, "greedy": torch_reference.greedy}
        if job.evaluation:
            check_context(model, "--eval-seqlen", job.evaluation.seqlen)
            corpus = load_corpus(job.evaluation.data)
            ids = evaluation_ids(corpus, tokenizer)

            def measure(logits_fn) -> dict:
                result = perplexity(logits_fn, ids, job.evaluation.seqlen, job.evaluation.max_windows, job.progress, corpus.name)
                return {"data": corpus.name, **result.to_dict()}

            reference["perplexity"] = measure(torch_logits_fn(model))
        zeros_before = source_zeros(model)
        architecture, config, generation_config = type(model).__name__, model.config, model.generation_config

        started = time.perf_counter()
        export_graph(model, tmp / GRAPH_NAME)
        export_seconds = time.perf_counter() - started
        del model
        release_memory()
        zeros = check_zeros(tmp / GRAPH_NAME, zeros_before)
        if not zeros["kept"]:
            raise ExportCheckFailed(f"export check failed: pruned zeros not found intact in the ONNX initializers ({zeros['missing'][:3]})")

        check = compare_with_torch(OnnxCausalLM(tmp / GRAPH_NAME, provider="cpu"), torch_reference, tokenizer)
        tolerance = LOGITS_TOLERANCE[job.dtype]
        if check["max_abs_logit_diff"] > tolerance or not check["greedy_equal"]:
            raise ExportCheckFailed(
                f"export check failed: onnxruntime logits differ from PyTorch by {check['max_abs_logit_diff']:.2g} "
                f"(tolerance {tolerance:g}), greedy continuation equal: {check['greedy_equal']}"
            )
        variants = {GRAPH_NAME: {"dtype": job.dtype, "check": check}}
        for kind in job.quantize:
            name = f"model.{kind}.onnx"
            quantize_graph(tmp / GRAPH_NAME, tmp / name, QUANTIZATIONS[kind])
            variants[name] = {"dtype": f"{kind} weights", "check": compare_with_torch(
                OnnxCausalLM(tmp / name, provider="cpu"), torch_reference, tokenizer)}
        if job.evaluation:
            for name in variants:
                variants[name]["perplexity"] = measure(OnnxCausalLM(tmp / name, provider="cpu").logits_fn())

        tokenizer.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)
        kv_heads, head_dim = _cache_shape(config)
        manifest = {
            "format": "ONNX decoder with KV cache (one graph: prefill with an empty past, then decode)",
            "source": source,
            "architecture": architecture,
            "graph": {"inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.{i}.key", "past_key_values.{i}.value"],
                      "outputs": ["logits", "present.{i}.key", "present.{i}.value"], "layers": config.num_hidden_layers,
                      "kv_heads": kv_heads, "head_dim": head_dim, "external_data": True},
            "export_seconds": export_seconds,
            "zeros": {"kept": zeros["kept"], "source_zeros": sum(l["source_zeros"] for l in zeros["layers"].values()),
                      "exported_zeros": sum(l["exported_zeros"] for l in zeros["layers"].values())},
            "pytorch_reference": reference,
            "variants": variants,
            "files": file_digests(tmp),
            "versions": package_versions(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
