"""Pruning benchmark: every method and option at 2:4 and unstructured 50%, against the dense model.

Methods magnitude, wanda, ria and sparsegpt; at 2:4 each with and without channel permutation,
the scoring methods also with reconstruction (and both); at 50% with and without reconstruction,
and wanda and ria with OWL. Every recipe runs in its own `wanda-serve` process, so peak memory is
per recipe, with the same calibration windows and the same evaluation windows. Writes a Markdown
table and the raw JSON.

    python bench/prune_methods.py --out docs/prune_benchmark.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCORING = ("magnitude", "wanda", "ria")
RECIPES = (  # (method, structure, options)
    *((m, "2:4", ()) for m in (*SCORING, "sparsegpt")),
    *((m, "2:4", ("--permute",)) for m in (*SCORING, "sparsegpt")),
    *((m, "2:4", ("--reconstruct",)) for m in SCORING),
    *((m, "2:4", ("--permute", "--reconstruct")) for m in SCORING),
    *((m, "0.5", ()) for m in (*SCORING, "sparsegpt")),
    *((m, "0.5", ("--reconstruct",)) for m in SCORING),
    *((m, "0.5", ("--owl",)) for m in ("wanda", "ria")),
)


def wanda_serve(*args: str) -> None:
    command = [sys.executable, "-m", "wanda_serve", *args]
    print("$", shlex.join(["wanda-serve", *args]), flush=True)
    subprocess.run(command, check=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: every window of the held-out region")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-prune"))
    parser.add_argument("--out", type=Path, default=Path("docs/prune_benchmark.md"))
    parser.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the results of recipes already measured in --work (same settings assumed)")
    args = parser.parse_args()

    model = [args.model] if args.model else []
    evaluation = ["--eval-seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.eval_windows:
        evaluation += ["--eval-windows", str(args.eval_windows)]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if not (args.resume and (args.work / "dense.eval.json").is_file()):
        wanda_serve("eval", *model, *evaluation, "--json", str(args.work / "dense.eval.json"))
    rows = [{"method": "dense", "structure": "-", "eval": json.loads((args.work / "dense.eval.json").read_text())}]
    for method, structure, options in RECIPES:
        name = "-".join([method, structure.replace(":", "of"), *(o.removeprefix("--") for o in options)])
        out, report_path, eval_path = args.work / name, args.work / f"{name}.report.json", args.work / f"{name}.eval.json"
        if not (args.resume and report_path.is_file() and eval_path.is_file()):
            wanda_serve(
                "prune", *model, "--method", method, "--structure", structure, *options, "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen), "--device", args.device, "--no-eval", "--overwrite", "--out", str(out),
            )
            shutil.copyfile(out / "prune_report.json", report_path)
            wanda_serve("eval", str(out), *evaluation, "--json", str(eval_path))
            if not args.keep:
                shutil.rmtree(out)
        rows.append({"method": method, "structure": structure, "options": list(options),
                     "report": json.loads(report_path.read_text()), "eval": json.loads(eval_path.read_text())})

    command = "python bench/prune_methods.py " + shlex.join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.write_text(render(rows, command, args, time.time() - started))
    print(args.out.read_text())


def render(rows: list[dict], command: str, args, elapsed: float) -> str:
    dense = rows[0]["eval"]["perplexity"]
    lines = [
        "# Pruning benchmark",
        "",
        f"Command: `{command}` ({elapsed / 60:.0f} min for the recipes this invocation measured)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, device `{args.device}`; "
        + ", ".join(f"{k} {v}" for k, v in rows[0]["eval"]["versions"].items()) + ".",
        "",
        f"Model: {rows[0]['eval']['model']}. Calibration: {args.nsamples} windows of {args.seqlen} tokens from the "
        f"calibration region (seed 0, identical for every method). Evaluation: perplexity on {dense['windows']} "
        f"non-overlapping windows of {dense['seqlen']} tokens of {dense['data']}, held-out region.",
        "",
        "Mask s: time spent choosing masks and updating weights, forward passes excluded (as the Wanda paper reports). "
        "Total s: the whole `wanda-serve prune` process (loading, calibration, forward passes, saving). "
        "Peak RSS: the process's peak resident memory.",
        "",
        "| method | options | structure | perplexity | vs dense | mask s | forward s | total s | peak RSS MiB | sparsity | N:M valid |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ppl = row["eval"]["perplexity"]["perplexity"]
        audit = row["eval"]["sparsity"]
        if "report" not in row:
            lines.append(f"| dense | | - | {ppl:.2f} | 1.00x | - | - | - | - | {audit['overall_sparsity']:.3f} | - |")
            continue
        report = row["report"]
        structure = row["structure"]
        valid = audit["all_nm_valid"].get(structure, "-") if ":" in structure else "-"
        lines.append(
            f"| {row['method']} | {' '.join(row['options'])} | {structure} | {ppl:.2f} | {ppl / dense['perplexity']:.2f}x | {report['mask_seconds']:.2f} | "
            f"{report['forward_seconds']:.1f} | {report['total_seconds']:.1f} | {report['memory']['peak_rss_mib']:.0f} | "
            f"{audit['overall_sparsity']:.3f} | {valid if valid == '-' else ('yes' if valid else 'NO')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
