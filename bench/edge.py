"""Edge exports of SmolLM2-135M, dense and pruned: size, perplexity and CPU speed, next to PyTorch eager.

Prunes the embedded model with the default recipe (every option spelled out), then makes every edge
export of the dense and the pruned model with the real CLI, each in its own process: `export onnx`
(fp32 with its int8 and int4 weight-only variants), `export ort-genai` (int4 and fp32 for the CPU) and
`export gguf` (f16, q8_0 and q4_0). Then, in this process, each runtime is loaded once and measured:

- perplexity on the first --eval-windows windows of --eval-seqlen tokens of the held-out Wikipedia
  region, through the runtime itself: PyTorch's logits; onnx through wanda-serve's own onnxruntime
  runner (OnnxCausalLM); onnxruntime-genai through a Generator per window (`append_tokens`, then
  `get_output("logits")`: every position's logits; `get_logits()` gives only the last position's);
  GGUF through llama.cpp (llama-cpp-python, `logits_all=True`) when it is importable, and always
  through transformers' GGUF loader (the file read back and dequantized to float32, run by PyTorch);
- prefill: the seconds from a new cache (a new onnxruntime-genai Generator) to the first token of a
  --prompt-tokens prompt (the held-out tokens that follow the perplexity windows), batch 1;
- decode: --new-tokens greedy tokens, the first from the prefill, each other one from a forward pass of
  one token through the runtime's KV cache, the argmax taken in Python for every runtime
  (onnxruntime-genai: `append_tokens([[token]])`, then `get_logits()`, as wanda-serve's export check
  steps it); tokens/s over those forward passes.

Timings are taken side by side: after --warmup rounds, --repeats rounds each run every runtime of
both models once, in an order rotated every round, so that drift on a noisy shared CPU hits all of
them alike; the page gives medians, and each speed-up is the median of the per-round ratios.

    python bench/edge.py --out docs/edge_benchmark.md   # --model DIR: another local model instead of SmolLM2

The pruned model, each export and each perplexity are stored in --work with the options, the code's
provenance and the hash of what they read; --resume reuses only results measured the same way (and
an export only while its directory still holds what its manifest says), otherwise stops with one line
saying what differs (--recompute-stale measures them again). Timings are never reused: every
invocation measures all of them together.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import (  # noqa: E402
    DEFAULT_RECIPE, NUMERIC_SOURCES, Settings, argv, cpu_name, provenance, stored_result, wanda_serve, weights_sha256, write_page,
)

from exporters.gguf_export import logits_tolerance_text  # noqa: E402
from exporters.onnx_runtime import OnnxCausalLM, positions_from_mask  # noqa: E402
from exporters.verify import release_memory  # noqa: E402
from wanda_serve.artifacts import package_version  # noqa: E402
from wanda_serve.contract import MANIFEST_NAME  # noqa: E402
from wanda_serve.data import evaluation_ids, load_corpus  # noqa: E402
from wanda_serve.evaluate import perplexity  # noqa: E402
from wanda_serve.models import EMBEDDED_MODEL_NAME, load_model, resolve_model  # noqa: E402

GOAL_SPEEDUP = 2.0  # decode tokens/s of at least one edge export over PyTorch eager fp32's, same model
EVAL_DATA = "wiki"
PYTORCH = "PyTorch"  # the export column of the rows that run no export
REFERENCE = (PYTORCH, "fp32")  # (export, precision) of the row every other is compared with
LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class EdgeExport:
    """One `wanda-serve export` of a model: its options, and the code and packages that make it."""

    key: str  # names its step and output
    kind: str  # the export subcommand
    options: dict[str, str | list[str]]  # a list: the option repeated
    sources: tuple[str, ...]  # under wanda_serve/, as prune_methods.provenance takes them
    packages: tuple[str, ...]

    def output(self, work: Path, model: str) -> Path:
        return work / (f"{model}-{self.key}.gguf" if self.kind == "gguf" else f"{model}-{self.key}")

    def manifest_path(self, out: Path) -> Path:
        return out.with_name(out.name + ".manifest.json") if self.kind == "gguf" else out / MANIFEST_NAME


_SHARED = ("models.py", "engine.py", "artifacts.py", "contract.py", "../exporters/verify.py")
GGUF_TYPES = ("f16", "q8_0", "q4_0")
EXPORTS = (
    EdgeExport("onnx", "onnx", {"--dtype": "float32", "--quantize": ["int8", "int4"]},
               (*_SHARED, "../exporters/onnx_export.py", "../exporters/onnx_runtime.py"), ("onnx", "onnxscript", "onnxruntime")),
    *(EdgeExport(f"ort-genai-{precision}", "ort-genai", {"--precision": precision, "--execution-provider": "cpu"},
                 (*_SHARED, "../exporters/ort_genai.py"), ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir"))
      for precision in ("int4", "fp32")),
    *(EdgeExport(f"gguf-{kind}", "gguf", {"--type": kind}, (*_SHARED, "../exporters/gguf_export.py", "../exporters/gguf_vocab.py"),
                 ("gguf",)) for kind in GGUF_TYPES),
)
EXPORTS_BY_KEY = {export.key: export for export in EXPORTS}
# What computes a perplexity besides the runtime's package and its class below (runtime_code): the text, the
# windows, the loop, model loading, wanda-serve's onnxruntime runner.
PERPLEXITY_SOURCES = ("data.py", "evaluate.py", "models.py", "../exporters/onnx_runtime.py")


def command_args(options: dict[str, str | list[str] | None]) -> list[str]:
    """argv for the options: None is a flag, a list repeats the option once per value."""
    tokens = []
    for option, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            tokens += [option] if one is None else [option, one]
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# Runtimes, each loaded once: logits for perplexity, and a timed greedy generation.


@dataclass(frozen=True)
class Generation:
    prefill_seconds: float  # from a new cache to the first token
    decode_seconds: float  # the other tokens, one forward pass each
    tokens: list[int]


class Runtime(Protocol):
    def logits(self, window: torch.Tensor) -> torch.Tensor: ...  # (1, T) ids -> (1, T, V)

    def generate(self, prompt: list[int], new_tokens: int) -> Generation: ...


class TorchRuntime:
    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls, location: Path, dtype: str) -> TorchRuntime:
        return cls(load_model(str(location), dtype).model)

    @torch.inference_mode()
    def logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=window, use_cache=False).logits

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        started = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = self.model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return Generation(prefilled - started, time.perf_counter() - prefilled, tokens)


class OnnxRuntime:
    """wanda-serve's onnxruntime runner (OnnxCausalLM) on the CPU execution provider, stepped as its generate() steps."""

    def __init__(self, path: Path):
        self.runner = OnnxCausalLM(path, provider="cpu")

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner.logits(window.numpy()).astype(np.float32))

    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        runner = self.runner
        started = time.perf_counter()
        ids = np.array([prompt], dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = runner.forward(ids, mask, positions_from_mask(mask), runner.empty_past(1))
        tokens = [int(logits[0, -1].argmax())]
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            logits, past = runner.forward(np.array([tokens[-1:]]), mask, np.array([[mask.shape[1] - 1]]), past)
            tokens.append(int(logits[0, -1].argmax()))
        return Generation(prefilled - started, time.perf_counter() - prefilled, tokens)


class GenaiRuntime:
    """onnxruntime-genai's Model on the CPU. Its Generator returns logits two ways: get_logits() the last
    position's, (1, 1, V); get_output("logits") the graph's whole output, every position of what was
    just appended. Perplexity reads the latter after appending a window to a new Generator."""

    def __init__(self, directory: Path):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(directory))
        config.clear_providers()  # the CPU
        self.model = og.Model(config)

    def generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        return self.og.Generator(self.model, params)

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        generator = self.generator(window.shape[1])
        generator.append_tokens(window.numpy().astype(np.int32))
        return torch.from_numpy(np.asarray(generator.get_output("logits"), dtype=np.float32))

    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        started = time.perf_counter()
        generator = self.generator(len(prompt) + new_tokens)
        generator.append_tokens([prompt])
        tokens = [int(generator.get_logits()[0, -1].argmax())]
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.append_tokens([tokens[-1:]])
            tokens.append(int(generator.get_logits()[0, -1].argmax()))
        return Generation(prefilled - started, time.perf_counter() - prefilled, tokens)


class LlamaCppRuntime:
    """llama.cpp through llama-cpp-python. logits_all=True keeps every position's logits (for perplexity);
    the timed prefill therefore also copies its prompt's logits out, as the other runtimes return them."""

    def __init__(self, path: Path, context: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False)

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(window[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[:window.shape[1]], dtype=np.float32)).unsqueeze(0)

    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        llm = self.llm
        started = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval(tokens[-1:])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return Generation(prefilled - started, time.perf_counter() - prefilled, tokens)


def llama_cpp_unavailable() -> str | None:
    """Why llama.cpp cannot be measured here; None if llama-cpp-python is importable."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    return (f"llama-cpp-python is not importable in this Python ({sys.executable}): it has no binary wheel here, and "
            "`pip install llama-cpp-python` compiles llama.cpp from source")


@dataclass(frozen=True)
class RuntimeSpec:
    """One row of each model: what runs it, on which export (None: the model's own checkpoint)."""

    key: str
    export: str  # PYTORCH, or the export's kind
    precision: str
    runtime: str  # the runtime's name on the page
    export_key: str | None
    file: str | None = None  # the graph file in the export, for onnx's variants
    timed: bool = True
    packages: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.export} {self.precision} on {self.runtime}"


ONNX_RUNNER = "onnxruntime (OnnxCausalLM)"
GENAI = "onnxruntime-genai"
READ_BACK = "transformers' GGUF read-back"
SPECS = (
    RuntimeSpec("pytorch-fp32", PYTORCH, "fp32", "eager", None),
    RuntimeSpec("pytorch-bf16", PYTORCH, "bf16", "eager", None),
    *(RuntimeSpec(f"onnx-{precision}", "onnx", precision, ONNX_RUNNER, "onnx", file, packages=("onnxruntime",))
      for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("int4", "model.int4.onnx"))),
    *(RuntimeSpec(f"ort-genai-{precision}", "ort-genai", precision, GENAI, f"ort-genai-{precision}",
                  packages=("onnxruntime-genai", "onnxruntime")) for precision in ("int4", "fp32")),
    *(spec for kind in GGUF_TYPES for spec in (
        RuntimeSpec(f"gguf-{kind}-llama.cpp", "gguf", kind, LLAMA_CPP, f"gguf-{kind}", packages=("llama-cpp-python",)),
        RuntimeSpec(f"gguf-{kind}-read-back", "gguf", kind, READ_BACK, f"gguf-{kind}", timed=False, packages=("gguf",)))),
)
NOT_TIMED = {READ_BACK: "not timed: PyTorch on the weights dequantized to float32, not a GGUF runtime"}


def open_runtime(spec: RuntimeSpec, location: Path, context: int) -> Runtime:
    """Load the runtime of a row; location is the model's directory (PyTorch) or the export's output."""
    loaders: dict[str, Callable[[], Runtime]] = {
        "eager": lambda: TorchRuntime.load(location, {"fp32": "float32", "bf16": "bfloat16"}[spec.precision]),
        ONNX_RUNNER: lambda: OnnxRuntime(location / spec.file),
        GENAI: lambda: GenaiRuntime(location),
        READ_BACK: lambda: TorchRuntime.load(location, "float32"),
        LLAMA_CPP: lambda: LlamaCppRuntime(location, context, torch.get_num_threads()),
    }
    return loaders[spec.runtime]()


RUNTIME_CLASSES = {"eager": TorchRuntime, ONNX_RUNNER: OnnxRuntime, GENAI: GenaiRuntime, READ_BACK: TorchRuntime,
                   LLAMA_CPP: LlamaCppRuntime}


def runtime_code(spec: RuntimeSpec) -> str:
    """A short hash of the source of the class that runs the row, so that a stored perplexity follows its code only."""
    return hashlib.sha256(inspect.getsource(RUNTIME_CLASSES[spec.runtime]).encode()).hexdigest()[:16]


def runtime_bytes(spec: RuntimeSpec, location: Path, manifest: dict | None) -> int | None:
    """The bytes of the files the runtime loads: graph and external weights, the GGUF file, the fp32 checkpoint."""
    if manifest is None:
        if spec.precision != "fp32":
            return None  # bf16 is cast from the fp32 checkpoint as it loads
        return sum(path.stat().st_size for path in location.glob("*.safetensors"))
    if spec.export == "gguf":
        return manifest["file"]["bytes"]
    graph = spec.file or json.loads((location / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return sum(entry["bytes"] for name, entry in manifest["files"].items() if name in (graph, f"{graph}.data"))


# ---------------------------------------------------------------------------------------------------------------------
# The page: rows, the goal's verdict, and the Markdown.


@dataclass(frozen=True)
class Row:
    model: str  # dense, pruned
    export: str
    precision: str
    runtime: str
    size_bytes: int | None
    perplexity: float | None  # None: not measured (not_measured says why)
    prefill_seconds: tuple[float, ...] = ()  # one per round, the rounds aligned across rows
    decode_seconds: tuple[float, ...] = ()
    decode_steps: int = 0  # forward passes in each decode_seconds
    tokens: tuple[int, ...] = ()  # the greedy continuation
    not_measured: str | None = None

    @property
    def label(self) -> str:
        return f"{self.export} {self.precision} on {self.runtime}"

    @property
    def timed(self) -> bool:
        return bool(self.decode_seconds)

    @property
    def prefill_ms(self) -> float:
        return statistics.median(self.prefill_seconds) * 1000

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / statistics.median(self.decode_seconds)

    @property
    def decode_spread(self) -> float:
        """(slowest - fastest) / median of the decode rounds."""
        return (max(self.decode_seconds) - min(self.decode_seconds)) / statistics.median(self.decode_seconds)


def reference_row(rows: tuple[Row, ...], model: str) -> Row | None:
    return next((row for row in rows if row.model == model and (row.export, row.precision) == REFERENCE), None)


def decode_speedup(row: Row, reference: Row) -> float:
    """The median over rounds of the reference's decode seconds over the row's, round by round."""
    return statistics.median(ref / own for ref, own in zip(reference.decode_seconds, row.decode_seconds))


def tokens_agreeing(row: Row, reference: Row) -> int:
    return next((i for i, (a, b) in enumerate(zip(row.tokens, reference.tokens)) if a != b), min(len(row.tokens), len(reference.tokens)))


@dataclass(frozen=True)
class Verdict:
    """The goal for one model: decode at least GOAL_SPEEDUP × PyTorch eager fp32 through an edge export."""

    model: str
    reference: Row
    qualifying: tuple[tuple[Row, float], ...]  # edge rows at or above the goal, with their speed-ups, lowest perplexity first
    fastest: tuple[Row, float] | None  # the fastest timed edge row; None: none was timed
    dense_perplexity: float | None = None  # the first model's PyTorch fp32 perplexity, for the models after it

    @property
    def met(self) -> bool:
        return bool(self.qualifying)

    def text(self) -> str:
        ref = self.reference
        if self.fastest is None:
            return f"{self.model}: **not measured**: no edge export was timed"
        if self.met:
            row, speedup = self.qualifying[0]
            others = "; also " + ", ".join(f"{r.label} {s:.2f}× at {_cost(r, ref)}" for r, s in self.qualifying[1:]) \
                if len(self.qualifying) > 1 else ""
            return (f"{self.model}: **met** by {len(self.qualifying)} of the edge exports. At the lowest perplexity cost, "
                    f"{row.label} decodes {speedup:.2f}× PyTorch eager fp32 ({row.decode_tokens_per_second:.1f} vs "
                    f"{ref.decode_tokens_per_second:.1f} tokens/s) at {_cost(row, ref)}{self._against_dense(row)}{others}.")
        row, speedup = self.fastest
        return (f"{self.model}: **not met**. The fastest edge export, {row.label}, decodes {speedup:.2f}× PyTorch eager fp32 "
                f"({row.decode_tokens_per_second:.1f} vs {ref.decode_tokens_per_second:.1f} tokens/s), "
                f"{GOAL_SPEEDUP / speedup:.2f}× short of the goal, at {_cost(row, ref)}{self._against_dense(row)}.")

    def _against_dense(self, row: Row) -> str:
        if self.dense_perplexity is None or row.perplexity is None:
            return ""
        return f" ({row.perplexity / self.dense_perplexity:.2f}× the dense model's PyTorch fp32 perplexity, {self.dense_perplexity:.2f})"


def _cost(row: Row, reference: Row) -> str:
    if row.perplexity is None or reference.perplexity is None:
        return "a perplexity not measured"
    return f"perplexity {reference.perplexity:.2f} → {row.perplexity:.2f} ({row.perplexity / reference.perplexity - 1:+.1%})"


def verdicts(rows: tuple[Row, ...]) -> list[Verdict]:
    """The goal's verdict for each model that has a timed PyTorch eager fp32 row (the first model's perplexity, the
    dense one's, is also each later model's baseline)."""
    found = []
    models = list(dict.fromkeys(row.model for row in rows))
    first = reference_row(rows, models[0]) if models else None
    for model in models:
        reference = reference_row(rows, model)
        if reference is None or not reference.timed:
            continue
        edge = [(row, decode_speedup(row, reference)) for row in rows if row.model == model and row.export != PYTORCH and row.timed]
        qualifying = sorted(((row, speedup) for row, speedup in edge if speedup >= GOAL_SPEEDUP),
                            key=lambda pair: (pair[0].perplexity is None, pair[0].perplexity or 0.0, -pair[1]))
        dense = first.perplexity if first is not None and model != models[0] else None
        found.append(Verdict(model, reference, tuple(qualifying), max(edge, key=lambda pair: pair[1], default=None), dense))
    return found


def goal_summary(found: list[Verdict]) -> str:
    met, missed = [v.model for v in found if v.met], [v.model for v in found if not v.met]
    if not found:
        return "**Not measured**: no model has a timed PyTorch eager fp32 row to compare with."
    if not met:
        return f"**Not met** for any model ({', '.join(missed)})."
    return f"**Met** for {' and '.join(met)}" + (f"; **not met** for {' and '.join(missed)}." if missed else ".")


@dataclass(frozen=True)
class ExportRow:
    model: str
    export: str  # its key
    command: str
    seconds: float  # the export's whole process
    checks: str
    zeros_kept: bool


def export_checks(kind: str, manifest: dict) -> tuple[str, bool]:
    """What the export's own checks found (its manifest), and whether every pruned zero is still zero."""
    if kind == "onnx":
        variants = manifest["variants"]
        graph = variants["model.onnx"]["check"]
        quantized = "; ".join(f"{name}: greedy tokens agreeing {' and '.join(map(str, variant['check']['greedy_tokens_agreeing']))}"
                              for name, variant in variants.items() if name != "model.onnx")
        return (f"model.onnx vs PyTorch: max abs logit diff {graph['max_abs_logit_diff']:.1e}, greedy equal: "
                f"{'yes' if graph['greedy_equal'] else 'no'}; {quantized}; zeros kept: {'yes' if manifest['zeros']['kept'] else 'NO'}",
                bool(manifest["zeros"]["kept"]))
    if kind == "ort-genai":
        zeros, greedy = manifest["zeros"], manifest["checks"]["greedy"]
        kept = f"all {zeros['source_zeros']:,}" if zeros["kept"] else f"{zeros['pruned_not_zero']:,} of {zeros['source_zeros']:,} NOT zero"
        return (f"greedy tokens agreeing with PyTorch fp32: {' and '.join(map(str, greedy['greedy_tokens_agreeing']))} of "
                f"{greedy['tokens']}, max log-prob gap {greedy['max_log_prob_gap']:.2g}; pruned zeros kept: {kept}",
                bool(zeros["kept"]))
    checks = manifest["checks"]
    logits, zeros, greedy = checks["logits"], checks["zeros"], checks["greedy"]
    return (f"read back: logits within {logits['relative_diff']:.2%} of the largest ({logits_tolerance_text(logits['tolerance'])}), greedy "
            f"tokens agreeing {' and '.join(map(str, greedy['tokens_agreeing']))} of {greedy['tokens']}; zeros kept "
            f"{zeros['zeros_kept']:,} of {zeros['source_zeros']:,}", bool(zeros["kept"]))


@dataclass(frozen=True)
class Page:
    command: str
    seconds: float  # this invocation
    machine: dict
    settings: dict
    exports: tuple[ExportRow, ...]
    rows: tuple[Row, ...]
    llama_cpp: str | None  # why llama.cpp was not measured; None: it was


def render(page: Page) -> str:
    settings, machine = page.settings, page.machine
    lines = [
        f"# Edge exports of {settings['model']}: size, perplexity and CPU speed",
        "",
        f"Written by `{page.command}` ({page.seconds / 60:.0f} min for this invocation); every number with its options and "
        "provenance, and every timing round, is in the JSON beside this page.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, no GPU; ATen kernels {machine['cpu_capability']}; PyTorch on "
        f"{machine['torch_threads']} threads, onnxruntime and onnxruntime-genai on their default thread pools, llama.cpp (where it runs) "
        f"on {machine['torch_threads']}; " + ", ".join(f"{name} {version}" for name, version in machine["versions"].items()) + ".",
        "",
        f"Models: {settings['model']} (dense), and the same pruned by `{settings['prune_command']}` (pruned: "
        "the default recipe, Wanda 2:4 with channel permutation). Each export is the real CLI in its own process, and each "
        "was checked by its own command (below) before it was measured here.",
        "",
        "How each figure is measured:",
        "",
        "- **Size**: the files the runtime loads (graph and its external weights; the GGUF file; PyTorch fp32: the "
        "safetensors checkpoint; bf16 is cast from it as it loads).",
        f"- **Perplexity**: the first {settings['eval_windows']} windows of {settings['eval_seqlen']} tokens of "
        f"{settings['data']}, held-out region, through the runtime itself: PyTorch's logits; onnx through wanda-serve's "
        "onnxruntime runner (`OnnxCausalLM.logits`, one pass with an empty past); onnxruntime-genai through a new "
        "`Generator` per window, `append_tokens(window)` then `get_output(\"logits\")` (every position; `get_logits()` "
        "returns only the last one); GGUF through llama.cpp when it runs here, and through transformers' GGUF loader (the "
        "file read back, dequantized to float32 and run by PyTorch: what the format's rounding costs, not llama.cpp's "
        "kernels).",
        f"- **Prefill ms**: from a new cache (onnxruntime-genai: a new `Generator`) to the first token of a "
        f"{settings['prompt_tokens']}-token prompt, batch 1: the held-out tokens that follow the perplexity windows.",
        f"- **Decode tokens/s**: {settings['new_tokens']} greedy tokens; the first comes from the prefill, the other "
        f"{settings['new_tokens'] - 1} from one forward pass of one token each through the runtime's KV cache, the argmax taken "
        "in Python for every runtime (onnxruntime-genai: `append_tokens([[token]])` then `get_logits()`). End of sequence "
        "neither stops nor is masked. × fp32: the same model's PyTorch eager fp32, the median of the per-round ratios. "
        "Spread: (slowest − fastest) / median round. Greedy: leading tokens equal to PyTorch fp32's.",
        f"- **Side by side**: this is a noisy shared {machine['cores']}-core CPU, so every runtime of both models is loaded "
        f"once in one process, warmed up ({settings['warmup']} round), then timed in {settings['repeats']} rounds; each "
        "round runs every runtime once, in an order rotated every round, so that drift hits all of them alike. Timings "
        "from separate runs are not comparable and are never reused.",
        "",
        "## Results",
        "",
        "| model | export | precision | runtime | size MiB | perplexity | × fp32 | prefill ms | decode tok/s | × fp32 "
        "| spread | greedy |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = {}
    for row in page.rows:
        reference = reference_row(page.rows, row.model)
        size = "-" if row.size_bytes is None else f"{row.size_bytes / 2**20:.1f}"
        ppl = "-" if row.perplexity is None else f"{row.perplexity:.2f}"
        ppl_ratio = "-" if row.perplexity is None or reference is None or reference.perplexity is None else \
            f"{row.perplexity / reference.perplexity:.2f}"
        if row.timed:
            compared = reference is not None and reference.timed
            timing = (f"{row.prefill_ms:.1f} | {row.decode_tokens_per_second:.1f} | "
                      f"{f'{decode_speedup(row, reference):.2f}' if compared else '-'} | {row.decode_spread:.0%} | "
                      f"{f'{tokens_agreeing(row, reference)} of {len(row.tokens)}' if compared else '-'}")
        else:
            mark = notes.setdefault(row.not_measured or "not timed", len(notes) + 1)
            timing = f"not timed ({mark}) | - | - | - | -"
            if row.perplexity is None:
                ppl = f"not measured ({mark})"
        lines.append(f"| {row.model} | {row.export} | {row.precision} | {row.runtime} | {size} | {ppl} | {ppl_ratio} | {timing} |")
    lines += ["", *(f"({mark}) {reason}." for reason, mark in notes.items())]

    found = verdicts(page.rows)
    lines += [
        "",
        f"## Goal: decode ≥ {GOAL_SPEEDUP:g}× PyTorch eager fp32 through at least one edge export",
        "",
        goal_summary(found),
        "",
        *(f"- {verdict.text()}" for verdict in found),
        "",
        "## llama.cpp",
        "",
        f"Measured with llama-cpp-python {machine['versions'].get('llama-cpp-python')} (the `llama.cpp` rows)."
        if page.llama_cpp is None else
        f"Not measured: {page.llama_cpp}. The GGUF files' speed in llama.cpp is therefore unknown here; their perplexity is "
        "measured through transformers' GGUF loader only.",
        "",
        "## The exports and their own checks",
        "",
        "```sh",
        *(row.command for row in page.exports),
        "```",
        "",
        "| model | export | process s | checks (from its manifest) | pruned zeros kept |",
        "|---|---|---:|---|---|",
        *(f"| {row.model} | {row.export} | {row.seconds:.0f} | {row.checks} | {'yes' if row.zeros_kept else '**NO**'} |"
          for row in page.exports),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Steps: stored with what decides them; --resume reuses one only if measured the same way and still in place.


class Store:
    """Each step's result as DIRECTORY/NAME.json."""

    def __init__(self, directory: Path, resume: bool, recompute_stale: bool):
        self.directory, self.resume, self.recompute_stale = directory, resume, recompute_stale
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, expected: dict, measure: Callable[[], dict], in_place: Callable[[dict], bool] | None = None) -> dict:
        """The stored result when --resume finds it measured as `expected` says (and `in_place` accepts it); else measure()."""
        path = self.directory / f"{name}.json"
        if self.resume:
            stored = stored_result(path, name, expected, self.recompute_stale)
            if stored is not None and (in_place is None or in_place(stored)):
                print(f"reusing {path}", flush=True)
                return stored
            if stored is not None:
                print(f"{name}: what it made is gone or changed: measuring it again", flush=True)
        record = {"step": name, **expected, **measure()}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record


@dataclass(frozen=True)
class Source:
    name: str  # dense, pruned
    cli_args: tuple[str, ...]  # MODEL on the command line (none: the embedded model)
    directory: Path
    sha256: str


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    return {name: package_version(name) for name in packages}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def prune(model_args: tuple[str, ...], options: dict, out: Path) -> dict:
    command = ["prune", *model_args, *argv(options), "--no-eval", "--overwrite", "--out", str(out)]
    wanda_serve(*command)
    return {"command": shlex.join(["wanda-serve", *command]), "weights_sha256": weights_sha256(out)}


def make_export(export: EdgeExport, source: Source, out: Path) -> dict:
    command = ["export", export.kind, *source.cli_args, *command_args(export.options), "--out", str(out), "--overwrite"]
    started = time.perf_counter()
    wanda_serve(*command)
    return {"command": shlex.join(["wanda-serve", *command]), "process_seconds": time.perf_counter() - started,
            "manifest": read_json(export.manifest_path(out))}


def identity(manifest: dict) -> str:
    """A short hash of an export's files as its manifest records them (sizes and SHA-256s)."""
    files = manifest.get("files") or manifest["file"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def pruned_source(store: Store, dense: Source, options: dict, out: Path) -> Source:
    """The dense model pruned with the default recipe into `out` (or what --resume finds there, made the same way)."""
    expected = {"options": {"prune": options}, "provenance": provenance(NUMERIC_SOURCES) | {"weights of dense": dense.sha256[:16]}}
    record = store.get("prune", expected, lambda: prune(dense.cli_args, options, out),
                       lambda stored: out.is_dir() and weights_sha256(out) == stored["weights_sha256"])
    return Source("pruned", (str(out),), out, record["weights_sha256"])


def make_exports(store: Store, sources: dict[str, Source], work: Path) -> dict[tuple[str, str], dict]:
    """Every export of every model, by (model, export key): its command, process seconds and manifest."""
    exports = {}
    for source in sources.values():
        for export in EXPORTS:
            out = export.output(work, source.name)
            expected = {"options": {f"export {export.kind}": export.options}, "provenance": provenance(export.sources)
                        | versions(export.packages) | {f"weights of {source.name}": source.sha256[:16]}}
            exports[(source.name, export.key)] = store.get(
                f"{source.name}.{export.key}", expected, lambda export=export, source=source, out=out: make_export(export, source, out),
                lambda stored, export=export, out=out: read_json(export.manifest_path(out)) == stored["manifest"])
    return exports


def export_of(spec: RuntimeSpec, source: Source, exports: dict[tuple[str, str], dict], work: Path) -> tuple[dict | None, Path]:
    """The manifest of the export a row runs (None: the model's own checkpoint) and where the runtime loads it from."""
    if spec.export_key is None:
        return None, source.directory
    return exports[(source.name, spec.export_key)]["manifest"], EXPORTS_BY_KEY[spec.export_key].output(work, source.name)


@dataclass(frozen=True)
class Windows:
    """The perplexity windows: the first `count` windows of `seqlen` tokens of the held-out ids."""

    ids: torch.Tensor
    seqlen: int
    count: int
    text_name: str

    def options(self) -> dict[str, dict[str, str]]:
        return {"perplexity": {"--data": EVAL_DATA, "--eval-seqlen": str(self.seqlen), "--eval-windows": str(self.count)}}


def measure_perplexities(store: Store, sources: dict[str, Source], exports: dict[tuple[str, str], dict], work: Path,
                         windows: Windows, context: int, no_llama_cpp: str | None
                         ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], Runtime]]:
    """Each row's perplexity through its runtime, by (model, spec key); and the timed runtimes, each loaded once and
    kept for the timing rounds (the others are loaded only to measure a perplexity --resume does not find)."""
    perplexities, timed = {}, {}
    for source in sources.values():
        for spec in SPECS:
            if spec.runtime == LLAMA_CPP and no_llama_cpp:
                continue
            manifest, location = export_of(spec, source, exports, work)
            loaded: list[Runtime] = []

            def runtime(spec=spec, location=location, loaded=loaded, model=source.name) -> Runtime:
                if not loaded:
                    print(f"loading {model} {spec.label}", flush=True)
                    loaded.append(open_runtime(spec, location, context))
                return loaded[0]

            if spec.timed:
                timed[(source.name, spec.key)] = runtime()
            expected = {"options": windows.options(), "provenance": provenance(PERPLEXITY_SOURCES) | versions(spec.packages) | {
                "runtime": spec.key, "runtime_code": runtime_code(spec),
                "weights": source.sha256[:16] if manifest is None else identity(manifest)}}
            result = store.get(f"{source.name}.{spec.key}.perplexity", expected, lambda runtime=runtime: {"perplexity": perplexity(
                runtime().logits, windows.ids, windows.seqlen, windows.count, progress=False, text_name=windows.text_name).to_dict()})
            perplexities[(source.name, spec.key)] = result["perplexity"]["perplexity"]
            print(f"{source.name} {spec.label}: perplexity {perplexities[(source.name, spec.key)]:.3f}", flush=True)
            if not spec.timed:
                loaded.clear()
                release_memory()
    return perplexities, timed


def timed_rounds(runtimes: dict[tuple[str, str], Runtime], prompt: list[int], new_tokens: int, warmup: int,
                 repeats: int) -> dict[tuple[str, str], list[Generation]]:
    """Every runtime once per round, the order rotated each round; the warm-up rounds are not kept."""
    keys = list(runtimes)
    for _ in range(warmup):
        for key in keys:
            runtimes[key].generate(prompt, new_tokens)
    measured: dict[tuple[str, str], list[Generation]] = {key: [] for key in keys}
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            measured[key].append(runtimes[key].generate(prompt, new_tokens))
        print(f"timing round {round_index + 1} of {repeats} done", flush=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path("docs/edge_benchmark.md"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-edge"))
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows for each perplexity")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run before timing, not kept")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the page gives medians")
    parser.add_argument("--resume", action="store_true", help="reuse the pruned model, exports and perplexities stored in --work, "
                                                              "if measured the same way")
    parser.add_argument("--recompute-stale", action="store_true",
                        help="with --resume: measure again what was measured otherwise, instead of stopping")
    args = parser.parse_args()
    if args.recompute_stale and not args.resume:
        parser.error("--recompute-stale goes with --resume")
    for option in ("eval_windows", "repeats", "prompt_tokens"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2 or args.eval_seqlen < 2 or args.warmup < 0:
        parser.error("--new-tokens and --eval-seqlen must be at least 2, --warmup at least 0")

    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    store = Store(args.work / "results", args.resume, args.recompute_stale)
    dense_directory = Path(resolve_model(args.model))
    model_args = (args.model,) if args.model else ()
    dense = Source("dense", model_args, dense_directory, weights_sha256(dense_directory))
    prune_options = Settings().prune_options(DEFAULT_RECIPE)
    sources = {"dense": dense, "pruned": pruned_source(store, dense, prune_options, args.work / "wanda-2of4")}
    exports = make_exports(store, sources, args.work)

    corpus = load_corpus(EVAL_DATA)
    ids = evaluation_ids(corpus, AutoTokenizer.from_pretrained(dense_directory))
    evaluated = args.eval_windows * args.eval_seqlen
    if ids.numel() < evaluated + args.prompt_tokens:
        sys.exit(f"error: the held-out {EVAL_DATA} text has {ids.numel()} tokens, fewer than {args.eval_windows} windows of "
                 f"{args.eval_seqlen} and a prompt of {args.prompt_tokens}")
    prompt = ids[evaluated:evaluated + args.prompt_tokens].tolist()
    no_llama_cpp = llama_cpp_unavailable()
    windows = Windows(ids, args.eval_seqlen, args.eval_windows, corpus.name)
    context = max(args.eval_seqlen, args.prompt_tokens + args.new_tokens)
    perplexities, timed = measure_perplexities(store, sources, exports, args.work, windows, context, no_llama_cpp)
    measured = timed_rounds(timed, prompt, args.new_tokens, args.warmup, args.repeats)

    rows = []
    for source in sources.values():
        for spec in SPECS:
            manifest, location = export_of(spec, source, exports, args.work)
            runs = measured.get((source.name, spec.key), [])
            reason = no_llama_cpp if spec.runtime == LLAMA_CPP else NOT_TIMED.get(spec.runtime)
            rows.append(Row(source.name, spec.export, spec.precision, spec.runtime, runtime_bytes(spec, location, manifest),
                            perplexities.get((source.name, spec.key)), tuple(run.prefill_seconds for run in runs),
                            tuple(run.decode_seconds for run in runs), args.new_tokens - 1, tuple(runs[-1].tokens) if runs else (),
                            None if runs else reason))
    export_rows = []
    for (model, key), record in exports.items():
        checks, kept = export_checks(EXPORTS_BY_KEY[key].kind, record["manifest"])
        export_rows.append(ExportRow(model, key, record["command"], record["process_seconds"], checks, kept))

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch_threads": torch.get_num_threads(),
               "versions": versions(("torch", "transformers", "onnxruntime", "onnxruntime-genai", "gguf", "llama-cpp-python"))}
    settings = {"model": args.model or EMBEDDED_MODEL_NAME, "data": corpus.name, "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                "prune_command": shlex.join(["wanda-serve", "prune", *model_args, *argv(prune_options)]), "prompt_ids": prompt}
    command = shlex.join(["python", "bench/edge.py", *sys.argv[1:]])
    page = Page(command, time.time() - started, machine, settings, tuple(export_rows), tuple(rows), no_llama_cpp)
    write_page(args.out, page, render)


if __name__ == "__main__":
    main()
