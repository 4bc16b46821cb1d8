"""Recovery benchmark: perplexity against the distillation budget, in and out of domain.

For the default recipe (`--recipe fast`), SparseGPT 2:4, the best recipe (`--recipe best`) and the
default recipe with block-output refinement (Wanda's masks, refined as the best recipe refines), as
bench/prune_methods.py defines them, on the embedded SmolLM2: prune once, then `wanda-serve recover` once per budget, each a run of its own (warm-up and decay fit the
budget, as a user with that budget would run it) in its own process. Perplexity on the held-out
Wikipedia region (in domain: recovery trains on the Wikipedia calibration region) and on the held-out
news region (out of domain), wall time and tokens/s. Variants: the hidden-state term (SquareHead) and
bf16 autocast at one budget, and at the goal's budget the settings docs/recover_settings.md chose on
calibration text. Writes a Markdown page (with the goal's verdict), its JSON and a plot.

    python bench/recover.py --out docs/recover_benchmark.md

The pruned model and the teacher are measured once per recipe, by its first run (the others pass
--no-reference). Each result is stored in --records with every option that decides it, the SHA-256
of the pruned weights it started from, the version of the pruning code, and the provenance of the
code that trains and evaluates (as bench/prune_methods.py records it); --resume reuses only results
measured the same way. The records are committed: the whole run takes longer than one working
session, and they let the next session go on where this one stopped, on whatever machine it has;
--stored-only writes the page from them alone, naming the runs still to measure.
A recipe whose runs are all stored, from one pruned model, is reused without pruning. Otherwise the
recipe is pruned here (kept in --work, pruned again when it is gone or its options or the pruning
code changed), and a stored run stands only if it started from the same bytes: the CPU's kernels
decide the pruned weights, so a recipe's runs usually come from one machine. Each row names the
machine that trained it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prune_methods import (  # noqa: E402
    BEST_RECIPE, DEFAULT_RECIPE, MACHINE_KEYS, NUMERIC_SOURCES, REFINED_DEFAULT, SPARSEGPT, Machines, Recipe, argv, code_version, cpu_features,
    differences, goal_verdict, incomplete_banner, provenance, run_benchmark, stored_result, wanda_serve, weights_sha256,
    write_json,
)

from wanda_serve.contract import RECOVER_REPORT_NAME  # noqa: E402

# The recipes as the pruning benchmark defines them, under the names their stored results carry.
RECIPES = {"wanda-permute-2of4": DEFAULT_RECIPE, "sparsegpt-2of4": SPARSEGPT, "sparsegpt-refine-2of4": BEST_RECIPE,
           "wanda-permute-refine-2of4": REFINED_DEFAULT}
DEFAULT = "wanda-permute-2of4"  # the goal's recipe: what `wanda-serve prune` does without options
PRUNE_SHARED = {"--calib": "wiki", "--nsamples": "64", "--seqlen": "512", "--seed": "0", "--dtype": "float32"}
VARIANTS = {"base": {}, "squarehead": {"--hidden-weight": "1.0"}, "bf16": {"--dtype": "bfloat16"},
            # the lowest validation perplexity of docs/recover_settings.md, chosen on calibration text
            "batch1-seqlen128-beta2-0.95": {"--batch-size": "1", "--seqlen": "128", "--adam-beta2": "0.95"},
            # recover's default before it froze them: in domain and out of domain, what training them too does
            "train-embeddings": {"--train-embeddings": None}}
# The goal: the default recipe recovered within GOAL_TOKENS at most GOAL x dense wiki perplexity (moonshot:
# MOONSHOT x); out of domain it should improve on the un-recovered model by a comparable factor, read as at
# least OUT_OF_DOMAIN_SHARE of the in-domain factor.
GOAL_TOKENS, GOAL, MOONSHOT, OUT_OF_DOMAIN_SHARE = 100_000, 2.0, 1.5, 0.75
RECOVER_SHARED = {"--seqlen": "256", "--batch-size": "4", "--lr": "3e-4", "--warmup": "0.05", "--temperature": "1.0",
                  "--data": "wiki", "--seed": "0", "--eval-data": "wiki", "--out-of-domain": "news", "--eval-seqlen": "1024"}


# The code that recovers and evaluates; the pruning code is stood for by the pruned weights' hash.
RECOVER_SOURCES = ("recover.py", "data.py", "models.py", "evaluate.py", "jobs.py")


@dataclass(frozen=True)
class Run:
    recipe: str
    variant: str
    tokens: int
    reference: bool  # also measures the pruned model before recovery and the teacher

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.variant}-{self.tokens}"


def recover_options(run: Run, eval_windows: int | None) -> dict[str, str | None]:
    windows = {"--eval-windows": str(eval_windows)} if eval_windows else {}
    reference = {} if run.reference else {"--no-reference": None}
    return {"--tokens": str(run.tokens), **RECOVER_SHARED, **VARIANTS[run.variant], **windows, **reference}


def prune_options(recipe: Recipe) -> dict[str, str | None]:
    return {"--method": recipe.method, "--structure": recipe.structure, **dict.fromkeys(recipe.flags), **PRUNE_SHARED}


def pruned_model(recipe: str, work: Path) -> tuple[Path, str]:
    """The recipe's pruned model and the SHA-256 of its weights. Kept in --work beside a record of the prune options
    and the pruning code's provenance, and pruned again when either changed; the same code prunes to the same bytes
    on one machine, so stored results stay valid exactly when the weights they started from did not change."""
    pruned, record = work / f"{recipe}-pruned", work / f"{recipe}-pruned.json"
    expected = {"options": prune_options(RECIPES[recipe]), "provenance": provenance(NUMERIC_SOURCES)}
    if not (pruned / "prune_report.json").is_file() or not record.is_file() or json.loads(record.read_text()) != expected:
        record.unlink(missing_ok=True)
        wanda_serve("prune", "--out", str(pruned), *argv(expected["options"]), "--no-eval", "--overwrite")
        write_json(record, expected)
    return pruned, weights_sha256(pruned)[:16]


def run_provenance(sources: tuple[str, ...] = RECOVER_SOURCES) -> dict:
    """What decides a recovery run besides its options and its pruned weights' hash: the code that trains and
    evaluates, and the pruning code's version (a run reused without pruning again is checked against it)."""
    return provenance(sources) | {"prune_code_version": code_version(sources=NUMERIC_SOURCES)}


def stored_as_expected(expected: dict[Path, dict]) -> dict[Path, dict]:
    """The stored record at each path that was measured as expected (on any machine, from whatever pruned weights)."""
    stored = {path: json.loads(path.read_text()) for path in expected if path.is_file()}
    return {path: record for path, record in stored.items()
            if not differences(record, expected[path], (*MACHINE_KEYS, "pruned_sha256"))}


def pruned_hashes(records: dict[Path, dict]) -> set[str]:
    return {record["provenance"]["pruned_sha256"] for record in records.values()}


def stored_from_one_pruned_model(expected: dict[Path, dict]) -> dict[Path, dict] | None:
    """The stored record at each path, if every one was measured as expected and all started from the same pruned
    weights; None if any must be measured."""
    records = stored_as_expected(expected)
    return records if len(records) == len(expected) and len(pruned_hashes(records)) == 1 else None


def stored_from_reference(expected: dict[Path, dict]) -> dict[Path, dict]:
    """The stored records measured as expected that started from the same pruned weights as the first run's, which
    measured the model before recovery and the teacher; none without it."""
    records = stored_as_expected(expected)
    if (reference := records.get(next(iter(expected)))) is None:
        return {}
    return {path: record for path, record in records.items()
            if record["provenance"]["pruned_sha256"] == reference["provenance"]["pruned_sha256"]}


def runs_from_one_pruned_model(recipe: str, work: Path, expected: dict[Path, dict], measure: Callable[[Path, str], dict],
                               resume: bool, recompute_stale: bool) -> list[dict]:
    """The record of each run in `expected` (path -> what decides it, but the pruned weights' hash): all stored ones
    when they started from one pruned model; else the recipe pruned here and each run stored from those bytes
    reused, the others measured by `measure(pruned_directory, run_name)` and stored."""
    if resume and (stored := stored_from_one_pruned_model(expected)):
        return list(stored.values())
    pruned, pruned_sha256 = pruned_model(recipe, work)
    records = []
    for path, wanted in expected.items():
        wanted = wanted | {"provenance": wanted["provenance"] | {"pruned_sha256": pruned_sha256}}
        record = stored_result(path, path.stem, wanted, recompute_stale, any_machine=True) if resume else None
        if record is None:
            record = wanted | {"cpu_features": cpu_features(), "report": measure(pruned, path.stem)}
            write_json(path, record)
        records.append(record)
    return records


def recover(pruned: Path, out: Path, options: dict[str, str | None]) -> dict:
    """`wanda-serve recover` in its own process; its report."""
    wanda_serve("recover", str(pruned), "--out", str(out), *argv(options), "--overwrite")
    return json.loads((out / RECOVER_REPORT_NAME).read_text())


def row(run: Run, record: dict, reference: dict, machines: Machines) -> dict:
    report = record["report"]
    wiki, news = report["perplexity"].values()
    wiki_reference, news_reference = reference["perplexity"].values()
    return {"recipe": run.recipe, "variant": run.variant, "machine": machines.of(record), "budget": run.tokens, "tokens": report["tokens"],
            "wiki": wiki["after"]["perplexity"],
            "news": news["after"]["perplexity"], "wiki_before": wiki_reference["before"]["perplexity"],
            "news_before": news_reference["before"]["perplexity"], "wiki_teacher": wiki_reference["teacher"]["perplexity"],
            "news_teacher": news_reference["teacher"]["perplexity"],
            "train_seconds": report["train_seconds"], "tokens_per_second": report["tokens_per_second"],
            "cpu_share": report["train_cpu_seconds"] / (report["train_seconds"] * report["threads"]) if "threads" in report else None,
            "peak_rss_mib": report["memory"]["peak_rss_mib"], "mask_identical": report["mask_check"]["passed"]}


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"  # results stored before recover reported its CPU time


def render(rows: list[dict], machines: dict[str, str], command: str, seconds: float | None, out: Path,
           missing: tuple[str, ...] = ()) -> str:
    """The table, the plot's link and the goal's verdict. `seconds`: the invocation's, None when it measured nothing
    (--stored-only); `missing`: the runs not measured yet."""
    teacher = rows[0]
    took = "" if seconds is None else f" in {seconds / 60:.0f} minutes"
    lines = [
        "# Recovery: perplexity against the distillation budget",
        "",
        f"Written by `{command}`{took}; raw numbers in {out.with_suffix('.json').name}.",
        "",
        *incomplete_banner(len(rows), missing, "runs"),
        f"Embedded SmolLM2-135M-Instruct, dense teacher: wiki {teacher['wiki_teacher']:.2f}, news {teacher['news_teacher']:.2f}. "
        "Training text: the Wikipedia calibration region; wiki is its held-out region (in domain), news the held-out half "
        "of the Lee news corpus (out of domain). 0 tokens: the pruned model before recovery.",
        "",
        "CPU share: the training's CPU time over its wall time × torch threads; well below 1, other work shared the machine "
        "and tokens/s is lower than this machine gives alone. Machine: where the run trained (times compare only within one):",
        "",
        *(f"- {label}: {description}" for label, description in machines.items()),
        "",
        "| recipe | variant | tokens | machine | wiki | × dense | news | × dense | train s | tokens/s | CPU share | peak RSS MiB "
        "| mask identical |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        first = next(r for r in rows if r["recipe"] == recipe)
        lines.append(f"| {recipe} | | 0 | | {first['wiki_before']:.2f} | {first['wiki_before'] / first['wiki_teacher']:.2f} | "
                     f"{first['news_before']:.2f} | {first['news_before'] / first['news_teacher']:.2f} | | | | | |")
        for r in (r for r in rows if r["recipe"] == recipe):
            lines.append(f"| {recipe} | {r['variant']} | {r['tokens']} | {r['machine']} | {r['wiki']:.2f} | {r['wiki'] / r['wiki_teacher']:.2f} | "
                         f"{r['news']:.2f} | {r['news'] / r['news_teacher']:.2f} | {r['train_seconds']:.0f} | "
                         f"{r['tokens_per_second']:.0f} | {share(r['cpu_share'])} | "
                         f"{r['peak_rss_mib']:.0f} | {'yes' if r['mask_identical'] else 'no'} |")
    lines += ["", f"![perplexity against tokens]({out.with_suffix('.png').name})", "", *goal_lines(rows), ""]
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    """The goal's verdict for each recipe and variant measured at the goal's budget, and the mask check of every run."""
    lines = ["## Goal", ""]
    for r in (r for r in rows if r["budget"] == GOAL_TOKENS):
        ratio = r["wiki"] / r["wiki_teacher"]
        verdict = goal_verdict(ratio, GOAL, MOONSHOT)
        wiki_factor, news_factor = r["wiki_before"] / r["wiki"], r["news_before"] / r["news"]
        comparable = news_factor >= OUT_OF_DOMAIN_SHARE * wiki_factor
        lines.append(
            f"- {r['recipe']}{' (the default recipe, the goal)' if r['recipe'] == DEFAULT else ''}"
            f"{'' if r['variant'] == 'base' else ', ' + r['variant']} after {r['tokens']} tokens: "
            f"wiki {r['wiki']:.2f}, {ratio:.2f}x dense against ≤ {GOAL:g}x (moonshot ≤ {MOONSHOT:g}x): {verdict}. "
            f"Recovery divides perplexity by {wiki_factor:.2f} in domain and {news_factor:.2f} out of domain: "
            + ("comparable." if comparable else f"**not comparable** (under {OUT_OF_DOMAIN_SHARE:g}x the in-domain factor): "
               "the recovery fits the calibration domain more than the model."))
    if len(lines) == 2:
        lines.append(f"- No recipe was measured at {GOAL_TOKENS} tokens; the goal is not judged.")
    changed = [f"{r['recipe']} {r['variant']} {r['tokens']}" for r in rows if not r["mask_identical"]]
    lines.append("- Mask identical before and after: " + (f"**no** for {', '.join(changed)}." if changed else f"yes, in all {len(rows)} runs."))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, domain in zip(axes, ("wiki", "news")):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            base = [r for r in rows if r["recipe"] == recipe and r["variant"] == "base"]
            if base:
                axis.plot([0] + [r["tokens"] for r in base], [base[0][f"{domain}_before"]] + [r[domain] for r in base],
                          marker="o", label=recipe)
        axis.axhline(rows[0][f"{domain}_teacher"], color="gray", linestyle="--", label="dense")
        axis.set(title=f"{domain} ({'in' if domain == 'wiki' else 'out of'} domain)", xlabel="recovery tokens", yscale="log")
    axes[0].set_ylabel("perplexity")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--budgets", default="10000,25000,50000,100000,200000")
    parser.add_argument("--variants", default=f"squarehead,bf16,batch1-seqlen128-beta2-0.95@{GOAL_TOKENS},train-embeddings@{GOAL_TOKENS}",
                        help=f"besides base: VARIANT[@TOKENS], comma-separated, from {', '.join(VARIANTS)}; "
                             "TOKENS defaults to --variant-budget")
    parser.add_argument("--variant-budget", type=int, default=25000)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: every window of each held-out region")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-recover"), help="pruned and recovered models")
    parser.add_argument("--records", type=Path, default=Path("docs/recover_benchmark"), help="each run's stored result")
    parser.add_argument("--resume", action="store_true", help="reuse results stored in --records, if measured the same way")
    parser.add_argument("--recompute-stale", action="store_true")
    parser.add_argument("--stored-only", action="store_true",
                        help="measure nothing: write the page from the stored results, naming the runs they lack; a recipe "
                             "shows only with its first budget's run, which measures the model before recovery and the teacher")
    args = parser.parse_args()
    if args.stored_only and args.recompute_stale:
        parser.error("--stored-only measures nothing: it does not go with --recompute-stale")
    started = time.time()
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = [(name, int(tokens or args.variant_budget)) for name, _, tokens in
                (v.partition("@") for v in args.variants.split(",") if v)]
    if unknown := [name for name, _ in variants if name not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not args.stored_only:
        args.work.mkdir(parents=True, exist_ok=True)
        args.records.mkdir(parents=True, exist_ok=True)
    rows, machines, missing = [], Machines(), []
    for recipe in args.recipes.split(","):
        runs = [Run(recipe, "base", tokens, reference=i == 0) for i, tokens in enumerate(budgets)]
        runs += [Run(recipe, variant, tokens, reference=False) for variant, tokens in variants]
        options = {run.name: recover_options(run, args.eval_windows) for run in runs}
        expected = {args.records / f"{name}.json": {"options": {"prune": prune_options(RECIPES[recipe]), "recover": given},
                                                     "provenance": run_provenance()} for name, given in options.items()}
        if args.stored_only:
            stored = stored_from_reference(expected)
            missing += [run.name for run, path in zip(runs, expected) if path not in stored]
            measured = [(run, stored[path]) for run, path in zip(runs, expected) if path in stored]
        else:
            measured = list(zip(runs, runs_from_one_pruned_model(
                recipe, args.work, expected, lambda pruned, name: recover(pruned, args.work / name, options[name]),
                args.resume, args.recompute_stale)))
        # The first budget's run measured the reference; the table and the plot go by tokens, base runs first.
        rows += sorted((row(run, record, measured[0][1]["report"], machines) for run, record in measured),
                       key=lambda r: (r["variant"] != "base", r["tokens"]))
    if not rows:
        sys.exit(f"Error: --stored-only needs at least one recipe's first run stored in {args.records}")
    command = shlex.join(["python", "bench/recover.py", *sys.argv[1:]])
    write_json(args.out.with_suffix(".json"), {"command": command, "machines": machines.legend(), "rows": rows, "missing": missing})
    plot(rows, args.out.with_suffix(".png"))
    args.out.write_text(render(rows, machines.legend(), command, None if args.stored_only else time.time() - started, args.out,
                               tuple(missing)))


if __name__ == "__main__":
    run_benchmark(main)
