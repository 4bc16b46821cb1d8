"""The benchmark's tables, Markdown summary and PNG plots, built from the results alone.

One table of rows (ROWS) says which metrics are shown and how; the same cells make the summary's
per-level tables and the short table of the terminal and of the main job's REPORT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402

from deploy.results import COMPARED_FIELDS, VALUE_FIELDS, BenchResults, LevelResult  # noqa: E402


@dataclass(frozen=True)
class Row:
    """A metric in the tables: its label, the format of its cell, the result fields the format takes."""

    label: str
    fmt: str
    fields: tuple[str, ...]
    brief: bool = False  # also in the short table (terminal, REPORT.md)

    def __post_init__(self):
        unknown = [name for name in self.fields if name not in VALUE_FIELDS]
        assert not unknown, f"row {self.label!r}: no such result field {unknown}"

    @property
    def compared(self) -> bool:
        """One field, which has a ratio to dense."""
        return len(self.fields) == 1 and self.fields[0] in COMPARED_FIELDS

    def shown(self, dense: LevelResult) -> bool:
        return all(dense.value(name) is not None for name in self.fields)

    def value_cell(self, level: LevelResult) -> str:
        return self.fmt.format(*(level.value(name) for name in self.fields))

    def ratio_cell(self, ratios: dict[str, float]) -> str:
        if not self.compared:
            return ""
        return f"{ratios[self.fields[0]]:.3f}" if self.fields[0] in ratios else "–"


def _row(label: str, fmt: str, *fields: str, brief: bool = False) -> Row:
    return Row(label, fmt, fields, brief)


ROWS = (
    _row("requests/s", "{:.2f}", "request_throughput"),
    _row("output tokens/s", "{:.1f}", "output_throughput", brief=True),
    _row("total tokens/s", "{:.1f}", "total_token_throughput"),
    _row("TTFT mean (ms)", "{:.1f}", "mean_ttft_ms"),
    _row("TTFT p50 (ms)", "{:.1f}", "median_ttft_ms", brief=True),
    _row("TTFT p99 (ms)", "{:.1f}", "p99_ttft_ms"),
    _row("TPOT mean (ms)", "{:.2f}", "mean_tpot_ms"),
    _row("TPOT p50 (ms)", "{:.2f}", "median_tpot_ms", brief=True),
    _row("TPOT p99 (ms)", "{:.2f}", "p99_tpot_ms"),
    _row("ITL mean (ms)", "{:.2f}", "mean_itl_ms"),
    _row("ITL p50 (ms)", "{:.2f}", "median_itl_ms"),
    _row("ITL p99 (ms)", "{:.2f}", "p99_itl_ms"),
    _row("end-to-end mean (ms)", "{:.0f}", "mean_e2el_ms"),
    _row("end-to-end p50 (ms)", "{:.0f}", "median_e2el_ms"),
    _row("end-to-end p99 (ms)", "{:.0f}", "p99_e2el_ms"),
    _row("$ per million output tokens", "{:.3f}", "dollars_per_million_output_tokens"),
    _row("completed / failed requests", "{} / {}", "completed", "failed", brief=True),
)
BRIEF_ROWS = tuple(row for row in ROWS if row.brief)


def _markdown_row(cells: list[str]) -> str:
    return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)


def _at_level(results: BenchResults, index: int) -> tuple[dict[str, LevelResult], dict[str, dict[str, float]]]:
    """Every model's result at one level, and each but dense's ratios to dense."""
    levels = {label: results.levels[label][index] for label in results.labels}
    return levels, {label: level.ratios(levels["dense"]) for label, level in levels.items() if label != "dense"}


def level_tables(results: BenchResults, rows: tuple[Row, ...] = ROWS) -> list[str]:
    """Per concurrency level, a table with a row per metric: each model's value, then its ratio to dense."""
    labels = results.labels
    lines = []
    for index, concurrency in enumerate(results.concurrency):
        levels, ratios = _at_level(results, index)
        lines += [f"## Concurrency {concurrency}", "",
                  _markdown_row(["metric", "dense", *(cell for label in labels[1:] for cell in (label, f"{label} / dense"))]),
                  "|---|" + "---:|" * (2 * len(labels) - 1)]
        for row in rows:
            if row.shown(levels["dense"]):
                cells = [row.value_cell(levels["dense"])]
                for label in labels[1:]:
                    cells += [row.value_cell(levels[label]), row.ratio_cell(ratios[label])]
                lines.append(_markdown_row([row.label, *cells]))
        for label, level in levels.items():
            if level.errors:
                lines.append(f"\n{label} errors: " + "; ".join(f"`{e[:160]}`" for e in level.errors))
        lines.append("")
    return lines


def model_table(results: BenchResults, rows: tuple[Row, ...] = BRIEF_ROWS) -> list[str]:
    """One table with a row per level and model: per metric its value and, where it has one, its ratio to dense."""
    rows = tuple(row for row in rows if row.shown(results.levels["dense"][0]))
    header = ["max concurrency", "model"]
    for row in rows:
        header += [row.label, "/ dense"] if row.compared else [row.label]
    lines = [_markdown_row(header), "|---:|---|" + "---:|" * (len(header) - 2)]
    for index, concurrency in enumerate(results.concurrency):
        levels, ratios = _at_level(results, index)
        for label, level in levels.items():
            cells = [str(concurrency) if label == "dense" else "", label]
            for row in rows:
                cells += [row.value_cell(level)] + ([row.ratio_cell(ratios[label]) if label in ratios else ""] if row.compared else [])
            lines.append(_markdown_row(cells))
    return lines


def _perplexity_line(perplexity: dict) -> str:
    def one(label):
        entry = perplexity.get(label)
        return f"{label} {entry['perplexity']:.2f}" if entry else f"{label} not recorded"

    measured = perplexity.get("pruned") or perplexity.get("dense")
    where = f" on {measured['data']} ({measured['windows']} × {measured['seqlen']} tokens)" if measured else ""
    line = f"- Perplexity{where}, from the prune reports: {one('dense')}, {one('pruned')}"
    if before := perplexity.get("pruned_before_recovery"):
        line += (f" (recovered by distillation on {perplexity['recovery_tokens']} tokens; "
                 f"{before['perplexity']:.2f} before)")
    return line


def _greedy_line(label: str, model: dict) -> str:
    check = model["greedy_check"]
    if check["passed"] is None:
        return f"- Greedy check, {label}: skipped ({check['skipped']})"
    equal = ", ".join(str(a["tokens_equal_to_reference_greedy"]) for a in check["answers"])
    tokens = len(check["answers"][0]["served_tokens"])
    return (f"- Greedy check, {label}: passed; served tokens equal to transformers' greedy for {equal} of {tokens} "
            f"tokens per prompt; largest log-probability gap {check['max_logprob_gap']:.3f} nats")


def write_summary(results: BenchResults, path: Path) -> None:
    workload, models, labels = results.workload, results.models, results.labels
    lines = [
        "# Pruned vs dense on vLLM",
        "",
        f"- dense: `{models['dense']['spec']}`; pruned: `{models['pruned']['spec']}`",
        f"- vLLM: {_vllm_line(models['dense'])}",
        *(f"- Sparse runtime ({label}: the pruned model on wanda-serve's vLLM plugin): "
          f"{models[label]['sparse_runtime']['description']}" for label in labels if "sparse_runtime" in models[label]),
        f"- Workload: {workload['requests_per_level_and_round']} requests per concurrency level and round, "
        f"{workload['rounds']} rounds alternating {'/'.join(labels)}; prompts of {workload['input_len']} tokens "
        f"({'held-out ' + workload['data'] + ' text' if workload['source'] == 'text' else 'random token ids'}, "
        f"seed {workload['seed']}), {workload['output_len']} output tokens, {workload['sampling']}",
        _perplexity_line(results.perplexity),
        *(_greedy_line(label, models[label]) for label in labels),
    ]
    if results.hour_price is not None:
        lines.append(f"- Cost at ${results.hour_price:g} per hour of serving hardware")
    lines += ["", *level_tables(results), "![throughput](throughput.png)", "", "![latency](latency.png)", ""]
    path.write_text("\n".join(lines))


def _vllm_line(model: dict) -> str:
    if "vllm" not in model:
        return f"running server at {model['spec']}"
    return f"{model['vllm']['name']} {model['vllm']['version']}, `{' '.join(model['command'])}`"


def _concurrency_axis(axis, levels: tuple[int, ...]) -> None:
    axis.set_xscale("log", base=2)
    axis.minorticks_off()
    axis.set(xlabel="max concurrency", xticks=levels, xticklabels=[str(level) for level in levels])


def write_plots(results: BenchResults, directory: Path) -> None:
    levels = results.concurrency

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name, title in zip(axes, ("output_throughput", "request_throughput"), ("output tokens/s", "requests/s")):
        for label, points in results.levels.items():
            axis.plot(levels, [p.value(name) for p in points], marker="o", label=label)
        _concurrency_axis(axis, levels)
        axis.set(title=title, ylim=(0, None))
        axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "throughput.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, metric, title in zip(axes, ("ttft", "tpot", "e2el"), ("time to first token", "time per output token", "end-to-end latency")):
        for color, (label, points) in zip(("C0", "C1", "C2"), results.levels.items()):
            axis.plot(levels, [p.value(f"median_{metric}_ms") for p in points], marker="o", color=color, label=f"{label} p50")
            axis.plot(levels, [p.value(f"p99_{metric}_ms") for p in points], marker="^", linestyle="--", color=color, label=f"{label} p99")
        _concurrency_axis(axis, levels)
        axis.set(ylabel="ms", title=title, ylim=(0, None))
        axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "latency.png", dpi=100)
    plt.close(figure)
