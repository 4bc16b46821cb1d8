"""The exports bench/edge.py makes, and the runtimes that load them: logits for perplexity, a timed greedy generation.

Each runtime is loaded once per model and row (RuntimeSpec); see bench/edge.py for how they are measured.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from exporters.onnx_runtime import OnnxCausalLM, positions_from_mask
from wanda_serve.contract import MANIFEST_NAME
from wanda_serve.models import load_model

PYTORCH = "PyTorch"  # the export column of the rows that run no export
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
# onnxruntime-genai's exports by key suffix: the precision column, and the options beyond --execution-provider cpu.
# The int4 quality settings: float32 activations in MatMulNBits instead of int8, or sensitive layers at 8 bits.
GENAI_EXPORTS = {
    "int4": ("int4", {"--precision": "int4"}),
    "int4-fp32-compute": ("int4, fp32 compute", {"--precision": "int4", "--accuracy-level": "1"}),
    "int4-int8-mixed": ("int4 + int8 mixed", {"--precision": "int4", "--int8-layers": "mixed"}),
    "fp32": ("fp32", {"--precision": "fp32"}),
}
EXPORTS = (
    EdgeExport("onnx", "onnx", {"--dtype": "float32", "--quantize": ["int8", "int4"]},
               (*_SHARED, "../exporters/onnx_export.py", "../exporters/onnx_runtime.py"), ("onnx", "onnxscript", "onnxruntime")),
    *(EdgeExport(f"ort-genai-{suffix}", "ort-genai", {**options, "--execution-provider": "cpu"},
                 (*_SHARED, "../exporters/ort_genai.py"), ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir"))
      for suffix, (_, options) in GENAI_EXPORTS.items()),
    *(EdgeExport(f"gguf-{kind}", "gguf", {"--type": kind}, (*_SHARED, "../exporters/gguf_export.py", "../exporters/gguf_vocab.py"),
                 ("gguf",)) for kind in GGUF_TYPES),
)
EXPORTS_BY_KEY = {export.key: export for export in EXPORTS}
# What computes a perplexity besides the runtime's package and its class below (runtime_code): the text, the
# windows, the loop, model loading, wanda-serve's onnxruntime runner.
PERPLEXITY_SOURCES = ("data.py", "evaluate.py", "models.py", "../exporters/onnx_runtime.py")


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
    return (f"llama-cpp-python is not importable in this Python ({sys.executable}): it has no binary wheel here; "
            "`make llama-cpp` compiles it from source")


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
    *(RuntimeSpec(f"ort-genai-{suffix}", "ort-genai", precision, GENAI, f"ort-genai-{suffix}",
                  packages=("onnxruntime-genai", "onnxruntime")) for suffix, (precision, _) in GENAI_EXPORTS.items()),
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
