"""The benchmark's Markdown summary and PNG plots, built from the results dict alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402

# (results key, label in the table, format)
TABLE_ROWS = (
    ("request_throughput", "requests/s", "{:.2f}"),
    ("output_throughput", "output tokens/s", "{:.1f}"),
    ("total_token_throughput", "total tokens/s", "{:.1f}"),
    ("mean_ttft_ms", "TTFT mean (ms)", "{:.1f}"),
    ("median_ttft_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("p99_ttft_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("mean_tpot_ms", "TPOT mean (ms)", "{:.2f}"),
    ("median_tpot_ms", "TPOT p50 (ms)", "{:.2f}"),
    ("p99_tpot_ms", "TPOT p99 (ms)", "{:.2f}"),
    ("mean_itl_ms", "ITL mean (ms)", "{:.2f}"),
    ("median_itl_ms", "ITL p50 (ms)", "{:.2f}"),
    ("p99_itl_ms", "ITL p99 (ms)", "{:.2f}"),
    ("mean_e2el_ms", "end-to-end mean (ms)", "{:.0f}"),
    ("median_e2el_ms", "end-to-end p50 (ms)", "{:.0f}"),
    ("p99_e2el_ms", "end-to-end p99 (ms)", "{:.0f}"),
    ("dollars_per_million_output_tokens", "$ per million output tokens", "{:.3f}"),
)


def _perplexity_line(results: dict) -> str:
    def one(label):
        entry = results["perplexity"].get(label)
        return f"{label} {entry['perplexity']:.2f}" if entry else f"{label} not recorded"

    measured = results["perplexity"].get("pruned") or results["perplexity"].get("dense")
    where = f" on {measured['data']} ({measured['windows']} × {measured['seqlen']} tokens)" if measured else ""
    line = f"- Perplexity{where}, from the prune reports: {one('dense')}, {one('pruned')}"
    if before := results["perplexity"].get("pruned_before_recovery"):
        line += (f" (recovered by distillation on {results['perplexity']['recovery_tokens']} tokens; "
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


def write_summary(results: dict, path: Path) -> None:
    workload, models = results["workload"], results["models"]
    labels = list(results["results"])
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
        _perplexity_line(results),
        *(_greedy_line(label, models[label]) for label in results["results"]),
    ]
    if results["hour_price"] is not None:
        lines.append(f"- Cost at ${results['hour_price']:g} per hour of serving hardware")
    lines.append("")
    for index, dense in enumerate(results["results"]["dense"]):
        levels = {label: results["results"][label][index] for label in labels}
        ratios = {label: results["ratios"][label][index] for label in labels[1:]}

        def row(first: str, value, ratio) -> str:  # a cell per model, and a ratio cell per model compared to dense
            cells = [first]
            for label in labels:
                cells += [value(label)] + ([ratio(label)] if label in ratios else [])
            return "| " + " | ".join(cells) + " |"

        lines += [f"## Concurrency {dense['max_concurrency']}", "", row("metric", str, lambda label: f"{label} / dense"),
                  "|---|" + "---:|" * (2 * len(labels) - 1)]
        for key, name, fmt in TABLE_ROWS:
            if dense.get(key) is not None:
                lines.append(row(name, lambda label: fmt.format(levels[label][key]),
                                 lambda label: f"{ratios[label][key]:.3f}" if key in ratios[label] else "–"))
        lines.append(row("completed / failed requests", lambda label: f"{levels[label]['completed']} / {levels[label]['failed']}",
                         lambda label: ""))
        for label, level in levels.items():
            if level["errors"]:
                lines.append(f"\n{label} errors: " + "; ".join(f"`{e[:160]}`" for e in level["errors"]))
        lines.append("")
    lines += ["![throughput](throughput.png)", "", "![latency](latency.png)", ""]
    path.write_text("\n".join(lines))


def _vllm_line(model: dict) -> str:
    if "vllm" not in model:
        return f"running server at {model['spec']}"
    return f"{model['vllm']['name']} {model['vllm']['version']}, `{' '.join(model['command'])}`"


def _concurrency_axis(axis, levels: list[int]) -> None:
    axis.set_xscale("log", base=2)
    axis.minorticks_off()
    axis.set(xlabel="max concurrency", xticks=levels, xticklabels=[str(level) for level in levels])


def write_plots(results: dict, directory: Path) -> None:
    levels = results["concurrency"]
    series = results["results"]

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in zip(axes, ("output_throughput", "request_throughput"), ("output tokens/s", "requests/s")):
        for label, points in series.items():
            axis.plot(levels, [p[key] for p in points], marker="o", label=label)
        _concurrency_axis(axis, levels)
        axis.set(title=title, ylim=(0, None))
        axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "throughput.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, metric, title in zip(axes, ("ttft", "tpot", "e2el"), ("time to first token", "time per output token", "end-to-end latency")):
        for color, (label, points) in zip(("C0", "C1", "C2"), series.items()):
            axis.plot(levels, [p[f"median_{metric}_ms"] for p in points], marker="o", color=color, label=f"{label} p50")
            axis.plot(levels, [p[f"p99_{metric}_ms"] for p in points], marker="^", linestyle="--", color=color, label=f"{label} p99")
        _concurrency_axis(axis, levels)
        axis.set(ylabel="ms", title=title, ylim=(0, None))
        axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "latency.png", dpi=100)
    plt.close(figure)
