"""Edge exports of SmolLM2-135M, dense and pruned: size, perplexity and CPU speed, next to PyTorch eager.

Prunes the embedded model with the default recipe (every option spelled out), then makes every edge
export of the dense and the pruned model with the real CLI, each in its own process: `export onnx`
(fp32 with its int8 and int4 weight-only variants), `export ort-genai` for the CPU (fp32, and int4 with the
builder's settings, with float32 activations in its MatMuls, and with sensitive layers at 8 bits) and
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
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from edge_page import ExportRow, Page, Row, render  # noqa: E402
from edge_runtimes import (  # noqa: E402
    EXPORTS, EXPORTS_BY_KEY, LLAMA_CPP, NOT_TIMED, PERPLEXITY_SOURCES, SPECS, EdgeExport, Generation, Runtime, RuntimeSpec,
    llama_cpp_unavailable, open_runtime, runtime_bytes, runtime_code,
)
from export_checks import export_checks  # noqa: E402
from prune_methods import (  # noqa: E402
    DEFAULT_RECIPE, NUMERIC_SOURCES, Settings, argv, cpu_name, provenance, run_benchmark, stored_result, wanda_serve, weights_sha256,
    write_json, write_page,
)

from exporters.verify import release_memory  # noqa: E402
from wanda_serve.artifacts import package_version  # noqa: E402
from wanda_serve.data import evaluation_ids, load_corpus  # noqa: E402
from wanda_serve.evaluate import perplexity  # noqa: E402
from wanda_serve.models import EMBEDDED_MODEL_NAME, resolve_model  # noqa: E402

EVAL_DATA = "wiki"


def command_args(options: dict[str, str | list[str] | None]) -> list[str]:
    """argv for the options: None is a flag, a list repeats the option once per value."""
    tokens = []
    for option, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            tokens += [option] if one is None else [option, one]
    return tokens


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
        write_json(path, record)
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
        check = export_checks(EXPORTS_BY_KEY[key].kind, record["manifest"])
        export_rows.append(ExportRow(model, key, record["command"], record["process_seconds"], check.text, check.zeros_kept))

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
    run_benchmark(main)
