"""Pruning benchmark: every method and option at 2:4 and unstructured 50%, against the dense model.

Methods magnitude, wanda, ria, sparsegpt and alps; at 2:4 each with and without channel
permutation, the scoring methods also with reconstruction (and both); at 50% with and without
reconstruction, and wanda and ria with OWL; block order and block-output refinement on the
methods they are meant for. Every recipe runs in its own `wanda-serve` process, so peak memory is
per recipe, with the same calibration windows and the same evaluation windows: the held-out
Wikipedia region (the calibration domain) and the held-out news region (out of domain). Writes a
Markdown table and the raw JSON.

    python bench/prune_methods.py --out docs/prune_benchmark.md

Every recipe spells out every option that decides its numbers, `--permute` or `--no-permute`
included, so a change of wanda-serve's defaults cannot change what a row means. Each row of the
JSON records those options, the code version and the machine. The page and its JSON are rewritten
after every recipe measured, so a run cut short leaves a page that says which recipes it lacks;
`--resume` reuses a row of the JSON only if all of the above are the same now, and otherwise stops
with one line saying what differs (`--recompute-stale` measures such recipes again instead). The
whole table takes longer than one working session on 2 cores: its JSON, committed, is what lets
the next session on another machine of the same kind go on where this one stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from wanda_serve.artifacts import write_file_atomically
from wanda_serve.jobs import PruneJob

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "wanda_serve"
# The modules whose code decides the numbers: calibration and evaluation text, model loading, the
# engine, the methods, masks and permutations, perplexity, and the job that wires them together.
# The code version is a hash of their contents. A git commit would change with every unrelated
# commit (README, deploy/) and miss uncommitted edits; a dirty flag would stop a resume for an edit
# anywhere. The CLI only parses options, which are recorded in full. Editing a comment in these
# files changes the version too: that errs towards measuring again.
NUMERIC_SOURCES = ("data.py", "models.py", "engine.py", "methods.py", "permute.py", "structure.py", "evaluate.py", "jobs.py")
# Packages whose code computes the numbers (the model's forward pass, tokenization).
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers")


@dataclass(frozen=True)
class Recipe:
    method: str
    structure: str
    flags: tuple[str, ...]  # the recipe's own options; shared settings come from Settings

    @property
    def name(self) -> str:
        return "-".join([self.method, self.structure.replace(":", "of"), *(f.removeprefix("--") for f in self.flags)])


SCORING = ("magnitude", "wanda", "ria")
HESSIAN = ("sparsegpt", "alps")  # the methods that choose their own mask and update the weights they keep
REFINE = "--refine=10"
RECIPES = (
    *(Recipe(m, "2:4", ("--no-permute",)) for m in (*SCORING, *HESSIAN)),
    *(Recipe(m, "2:4", ("--permute",)) for m in (*SCORING, *HESSIAN)),
    *(Recipe(m, "2:4", ("--no-permute", "--reconstruct")) for m in SCORING),
    *(Recipe(m, "2:4", ("--permute", "--reconstruct")) for m in SCORING),
    Recipe("wanda", "2:4", ("--permute", "--block-order")),
    *(Recipe(m, "2:4", ("--permute", "--reconstruct", "--block-order")) for m in ("wanda", "ria")),
    *(Recipe(m, "2:4", ("--no-permute", "--block-order")) for m in HESSIAN),
    Recipe("wanda", "2:4", ("--permute", REFINE)),
    *(Recipe(m, "2:4", ("--no-permute", REFINE)) for m in HESSIAN),
    *(Recipe(m, "2:4", ("--no-permute", "--block-order", REFINE)) for m in HESSIAN),
    *(Recipe(m, "0.5", ("--no-permute",)) for m in (*SCORING, *HESSIAN)),
    *(Recipe(m, "0.5", ("--no-permute", "--reconstruct")) for m in SCORING),
    *(Recipe(m, "0.5", ("--no-permute", "--owl")) for m in ("wanda", "ria")),
    *(Recipe(m, "0.5", ("--no-permute", "--block-order")) for m in HESSIAN),
    Recipe("wanda", "0.5", ("--no-permute", REFINE)),
)
DEFAULT_RECIPE = Recipe("wanda", "2:4", ("--permute",))  # what `wanda-serve prune` does without options: --recipe fast
BEST_RECIPE = Recipe("sparsegpt", "2:4", ("--no-permute", REFINE))  # --recipe best
REFINED_DEFAULT = Recipe("wanda", "2:4", ("--permute", REFINE))  # the default's masks refined: a start for recovery
SPARSEGPT = Recipe("sparsegpt", "2:4", ("--no-permute",))  # the one-shot reference of the quality goal
# The one-shot quality goal at 2:4: wiki perplexity at most this share of SparseGPT's (the moonshot: the
# second), at most TIME_LIMIT x its total time; and block order may cost the fast default at most
# FAST_MASK_LIMIT x its mask time.
QUALITY_GOAL, MOONSHOT, TIME_LIMIT, FAST_MASK_LIMIT = 0.85, 0.75, 3.0, 2.0
# How far one recipe's perplexity moves between runs that differ only in float rounding (docs/determinism.md:
# a 4.5% spread): recipes closer than this are not told apart by one run.
ROUNDING_SPREAD = 0.05
OWL_OPTIONS = {"--owl-spread": "0.08", "--owl-outlier-factor": "5"}


TABLE_ORDER = ["dense", *(recipe.name for recipe in RECIPES)]  # the page's rows


def measurement_order() -> list[Recipe]:
    """RECIPES with the goal's rows first (the default, SparseGPT, the best, the refined ones), so that a run cut
    short (it resumes) has answered the goal before the rest of the table."""
    first = list(dict.fromkeys([DEFAULT_RECIPE, SPARSEGPT, BEST_RECIPE, *(recipe for recipe in RECIPES if REFINE in recipe.flags)]))
    return first + [recipe for recipe in RECIPES if recipe not in first]


@dataclass(frozen=True)
class Settings:
    """What every recipe shares: the model, calibration, evaluation and device."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = PruneJob.batch_size
    dtype: str = "float32"
    device: str = "cpu"
    eval_data: str = "wiki"
    out_of_domain: str = "news"  # a second held-out text, not the calibration domain
    eval_seqlen: int = 1024
    eval_windows: int | None = None  # None: every window of the held-out region

    def eval_options(self, data: str | None = None) -> dict[str, str]:
        windows = {"--eval-windows": str(self.eval_windows)} if self.eval_windows else {}
        return {"--data": data or self.eval_data, "--eval-seqlen": str(self.eval_seqlen), **windows, "--device": self.device}

    def recorded_options(self, recipe: Recipe | None) -> dict[str, dict]:
        """Every option of every command that measures the recipe (None: the dense model), as results record them.
        The model only when it is not the embedded one, which rows measured before it was recorded were measured on."""
        return {**({"model": {"name": self.model}} if self.model else {}),
                **({"prune": self.prune_options(recipe)} if recipe else {}), "eval": self.eval_options(),
                "eval_out_of_domain": self.eval_options(self.out_of_domain)}

    def prune_options(self, recipe: Recipe) -> dict[str, str | None]:
        """Every option of `wanda-serve prune` that decides the recipe's numbers (None: a flag)."""
        refines = any(flag.startswith("--refine") for flag in recipe.flags)
        return {
            "--method": recipe.method, "--structure": recipe.structure, **dict.fromkeys(recipe.flags),
            **({} if "--block-order" in recipe.flags else {"--one-pass": None}), **({} if refines else {"--refine": "0"}),
            **(OWL_OPTIONS if "--owl" in recipe.flags else {}),
            "--calib": self.calib, "--nsamples": str(self.nsamples), "--seqlen": str(self.seqlen), "--seed": str(self.seed),
            "--batch-size": str(self.batch_size), "--dtype": self.dtype, "--device": self.device,
        }


def argv(options: dict[str, str | None]) -> list[str]:
    return [token for option, value in options.items() for token in (option, *(() if value is None else (value,)))]


def code_version(package_dir: Path = PACKAGE_DIR, sources: tuple[str, ...] = NUMERIC_SOURCES) -> str:
    digest = hashlib.sha256()
    for name in sources:
        digest.update(f"{name} {hashlib.sha256((package_dir / name).read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def weights_sha256(directory: Path) -> str:
    """SHA-256 of a model directory's safetensors files, in name order, read in blocks."""
    digest = hashlib.sha256()
    for shard in sorted(directory.glob("*.safetensors")):
        with shard.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_id() -> str:
    """What tells apart CPUs that share a model name. Two 2-core cloud machines, both "Intel(R) Xeon(R) Processor"
    with AVX512 kernels, prune the same recipe to different perplexities (SparseGPT 2:4: 77.81 and 79.47): MKL
    chooses its blocking, and so its rounding, by the CPU's model, cache and features."""
    info = _cpuinfo()
    flags = hashlib.sha256(" ".join(sorted(info.get("flags", "").split())).encode()).hexdigest()[:8]
    return (f"family {info.get('cpu family', '?')} model {info.get('model', '?')} stepping {info.get('stepping', '?')}, "
            f"cache {info.get('cache size', '?')}, flags {flags}")


MACHINE_KEYS = ("cpu", "cpu_id", "cpu_capability")  # the provenance entries that name the machine
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "amx_tile")  # the CPU flags that decide how fast bfloat16 matrix products run


def cpu_features() -> list[str]:
    """The BF16_FEATURES this CPU has. Stored beside a result, not in its provenance (cpu_id tells machines apart
    already): the page says which machines had AMX when it compares bfloat16 with float32."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in BF16_FEATURES if flag in flags]


def provenance(sources: tuple[str, ...] = NUMERIC_SOURCES) -> dict:
    """What else decides the numbers: the code, the packages that compute, and the CPU's kernels (docs/determinism.md)."""
    return {
        "code_version": code_version(sources=sources),
        **{name: metadata.version(name) for name in NUMERIC_PACKAGES},
        "cpu": cpu_name(),
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_of(record: dict) -> tuple[str, ...]:
    """The machine a stored result was measured on, as its provenance names it."""
    return tuple(str(record["provenance"].get(key, "?")) for key in MACHINE_KEYS)


class Machines:
    """Short names (M1, M2, ...) for the machines stored results were measured on, in the order a page meets them."""

    def __init__(self):
        self.labels: dict[tuple[str, ...], str] = {}
        self.features: dict[str, list[str]] = {}  # label -> cpu_features(), where a result of that machine recorded them

    def of(self, record: dict) -> str:
        label = self.labels.setdefault(machine_of(record), f"M{len(self.labels) + 1}")
        if "cpu_features" in record:
            self.features[label] = record["cpu_features"]
        return label

    def bf16_units(self, label: str) -> str:
        """What the machine has for bfloat16 matrix products, as its results recorded it."""
        if label not in self.features:
            return "bfloat16 instructions not recorded"
        features = self.features[label]
        return (f"bfloat16 instructions: {', '.join(features) or 'none'}"
                f"{'' if 'amx_bf16' in features else ' (no AMX)'}")

    def legend(self) -> dict[str, str]:
        return {label: f"{cpu} ({identity}), ATen kernels {kernels}; {self.bf16_units(label)}"
                for (cpu, identity, kernels), label in self.labels.items()}


def differences(stored: dict, expected: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'what: stored X, now Y' for each option or provenance entry that differs, but those named in `ignore`."""
    if unrecorded := [key for key in expected if key not in stored]:
        return [f"it records no {' and no '.join(unrecorded)} (stored by an older bench/prune_methods.py)"]

    def flat(record: dict) -> dict:
        return {**{f"{command} {option}": value for command, given in record["options"].items() for option, value in given.items()},
                **record["provenance"]}

    def show(record: dict, key: str) -> str:
        return "(absent)" if key not in record else "(given)" if record[key] is None else str(record[key])

    old, new = flat(stored), flat(expected)
    return [f"{key}: stored {show(old, key)}, now {show(new, key)}"
            for key in dict.fromkeys([*new, *old]) if key not in ignore and (key in old, old.get(key)) != (key in new, new.get(key))]


def write_json(path: Path, data) -> None:
    """A stored result or a page's numbers, written whole or not at all: an interrupted run leaves the old file or
    none, never one that --resume cannot read."""
    write_file_atomically(path, json.dumps(data, indent=2) + "\n", overwrite=True, option="record")


def write_page(out: Path, page, render) -> None:
    """A benchmark's page: its typed data (a dataclass) as OUT.json and render(page) as OUT, which is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), dataclasses.asdict(page))
    out.write_text(render(page))
    print(out.read_text())


def stored_result(path: Path, label: str, expected: dict, recompute_stale: bool, any_machine: bool = False) -> dict | None:
    """The result stored at `path` if it was measured as `expected` says; None if it must be measured."""
    return reusable(json.loads(path.read_text()) if path.is_file() else None, f"{label} ({path})", expected, recompute_stale,
                    any_machine)


def reusable(stored: dict | None, label: str, expected: dict, recompute_stale: bool, any_machine: bool = False) -> dict | None:
    """`stored` if it was measured as `expected` says; None if it must be measured (None: nothing stored).

    A result measured otherwise stops the benchmark with one line, unless `recompute_stale`. With `any_machine`, a
    result measured on another CPU counts as measured the same way: the caller shows which machine measured it.
    """
    if stored is None:
        return None
    differ = differences(stored, expected, MACHINE_KEYS if any_machine else ())
    if not differ:
        return stored
    if recompute_stale:
        print(f"measuring {label} again: {'; '.join(differ)}", flush=True)
        return None
    sys.exit(f"error: --resume: the stored result of {label} was measured otherwise: {'; '.join(differ)}. "
             "Use --recompute-stale to measure it again, or run without --resume.")


def run_benchmark(main: Callable[[], None]) -> None:
    """A benchmark script's entry point. Each result is stored as soon as it is measured, so Ctrl-C ends the run with
    one line instead of a traceback (the `wanda-serve` step it cut short says its own), and --resume goes on from there."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("Error: interrupted; the results measured so far are stored: run the same command with --resume to go on")


def run_to_its_end(command: list[str], **popen) -> int:
    """Run `command` and return its exit code. Ctrl-C reaches the child too, and a `wanda-serve` child then saves its
    checkpoint and clears its partial output: this waits for that, where subprocess.run kills the child 0.25 s later."""
    with subprocess.Popen(command, **popen) as process:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise


def wanda_serve(*args: str, env: dict[str, str] | None = None) -> None:
    """Run `wanda-serve ARGS` in its own process, with `env` added to this one's environment."""
    env = env or {}
    print("$", shlex.join([*(f"{k}={v}" for k, v in env.items()), "wanda-serve", *args]), flush=True)
    command = [sys.executable, "-m", "wanda_serve", *args]
    if code := run_to_its_end(command, env=os.environ | env):
        raise subprocess.CalledProcessError(code, command)


def measure(recipe: Recipe | None, settings: Settings, work: Path, keep: bool) -> dict:
    """Prune with the recipe (None: the dense model) in its own process, then evaluate in another."""
    model = [settings.model] if settings.model else []
    evaluated = model
    if recipe is not None:
        out = work / recipe.name
        wanda_serve("prune", *model, *argv(settings.prune_options(recipe)), "--no-eval", "--overwrite", "--out", str(out))
        evaluated = [str(out)]
    result = {}
    for key, data in (("eval", settings.eval_data), ("eval_out_of_domain", settings.out_of_domain)):
        eval_path = work / f"{recipe.name if recipe else 'dense'}.{key}.json"
        wanda_serve("eval", *evaluated, *argv(settings.eval_options(data)), "--json", str(eval_path), "--overwrite")
        result[key] = json.loads(eval_path.read_text())
    if recipe is not None:
        result["report"] = json.loads((out / "prune_report.json").read_text())
        if not keep:
            shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: every window of the held-out region")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-prune"), help="pruned checkpoints and evaluation outputs")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/prune_benchmark.md, or docs/prune_benchmark_MODEL.md with --model")
    parser.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows of OUT's JSON that were measured with the same options, code version and machine")
    parser.add_argument("--recompute-stale", action="store_true",
                        help="with --resume: measure again the recipes whose stored result was measured otherwise, instead of stopping")
    args = parser.parse_args()
    if args.recompute_stale and not args.resume:
        parser.error("--recompute-stale goes with --resume")

    args.out = args.out or Path(f"docs/prune_benchmark{f'_{Path(args.model).name}' if args.model else ''}.md")
    settings = Settings(model=args.model, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows)
    args.work.mkdir(parents=True, exist_ok=True)
    page_json = args.out.with_suffix(".json")
    # rows of an older page name no recipe: none is reused
    stored = {row.get("name"): row for row in json.loads(page_json.read_text())} if args.resume and page_json.is_file() else {}
    command = "python bench/prune_methods.py " + shlex.join(sys.argv[1:])
    now = provenance()
    recipes = {(recipe.name if recipe else "dense"): recipe for recipe in (None, *measurement_order())}  # None: the dense model
    expected = {name: {"options": settings.recorded_options(recipe), "provenance": now} for name, recipe in recipes.items()}
    # Every stored row is judged before anything is measured, and every reusable one stays on each page written.
    results = {name: row for name in recipes
               if args.resume and (row := reusable(stored.get(name), f"{name} (in {page_json})", expected[name], args.recompute_stale))}
    for name, recipe in recipes.items():
        if name not in results:
            started = time.time()
            results[name] = {"name": name, "recipe": asdict(recipe) if recipe else None, **expected[name],
                             **measure(recipe, settings, args.work, args.keep), "wall_seconds": time.time() - started}
            write_table(args.out, results, command, settings, now)
    write_table(args.out, results, command, settings, now)  # rendered anew even when every row was reused
    print(args.out.read_text())


def write_table(out: Path, results: dict[str, dict], command: str, settings: Settings, now: dict) -> None:
    """The page and its JSON from the rows measured so far, by name, in table order (dense first)."""
    rows = [results[name] for name in TABLE_ORDER if name in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), rows)
    out.write_text(render(rows, command, settings, now))


def render(rows: list[dict], command: str, settings: Settings, now: dict) -> str:
    dense, dense_news = rows[0]["eval"]["perplexity"], rows[0]["eval_out_of_domain"]["perplexity"]
    missing = [name for name in TABLE_ORDER if name not in {row["name"] for row in rows}]
    measuring = sum(row.get("wall_seconds", 0) for row in rows) / 60
    lines = [
        "# Pruning benchmark",
        "",
        f"Command: `{command}`; {measuring:.0f} min of measuring for the rows below, over one or more invocations "
        "(`--resume` goes on from the rows this page's JSON holds).",
        "",
        *incomplete_banner(len(rows) - 1, missing, "recipes"),
        f"Machine: {now['cpu']} ({now['cpu_id']}), {os.cpu_count()} cores, ATen kernels {now['cpu_capability']}, device `{settings.device}`; "
        + ", ".join(f"{k} {v}" for k, v in rows[0]["eval"]["versions"].items())
        + f". Code version {now['code_version']} (a hash of wanda_serve/{{{','.join(NUMERIC_SOURCES)}}}); every row was measured "
        "with it on this machine. Results of the same recipe move between CPUs: [determinism.md](determinism.md).",
        "",
        f"Model: {rows[0]['eval']['model']}. Calibration: {settings.nsamples} windows of {settings.seqlen} tokens of "
        f"{settings.calib} from the calibration region (seed {settings.seed}, batches of {settings.batch_size}, identical for "
        f"every method), {settings.dtype}. Evaluation: perplexity on {dense['windows']} non-overlapping windows of "
        f"{dense['seqlen']} tokens of {dense['data']}, held-out region (wiki), and on {dense_news['windows']} windows of "
        f"{dense_news['data']}, held-out region (news: out of the calibration domain). Options: each recipe's own; the rest "
        "as above, spelled out in the JSON.",
        "",
        "Mask s: time spent choosing masks and updating weights, forward passes excluded (as the Wanda paper reports). "
        "Total s: the whole `wanda-serve prune` process (loading, calibration, forward passes, saving). "
        "Peak RSS: the process's peak resident memory.",
        "",
        "| method | options | structure | wiki | vs dense | news | vs dense | mask s | forward s | total s | peak RSS MiB | sparsity | N:M valid |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ppl, news = row["eval"]["perplexity"]["perplexity"], row["eval_out_of_domain"]["perplexity"]["perplexity"]
        audit = row["eval"]["sparsity"]
        if "report" not in row:
            lines.append(f"| dense | | - | {ppl:.2f} | 1.00x | {news:.2f} | 1.00x | - | - | - | - | {audit['overall_sparsity']:.3f} | - |")
            continue
        report, recipe = row["report"], row["recipe"]
        structure = recipe["structure"]
        valid = audit["all_nm_valid"].get(structure, "-") if ":" in structure else "-"
        lines.append(
            f"| {recipe['method']} | {' '.join(recipe['flags'])} | {structure} | {ppl:.2f} | {ppl / dense['perplexity']:.2f}x | "
            f"{news:.2f} | {news / dense_news['perplexity']:.2f}x | "
            f"{report['mask_seconds']:.2f} | {report['forward_seconds']:.1f} | {report['total_seconds']:.1f} | "
            f"{report['memory']['peak_rss_mib']:.0f} | {audit['overall_sparsity']:.3f} | "
            f"{valid if valid == '-' else ('yes' if valid else 'NO')} |"
        )
    return "\n".join(lines + goal_lines(rows)) + "\n"


def _wiki(row: dict) -> float:
    return row["eval"]["perplexity"]["perplexity"]


def _label(recipe: Recipe) -> str:
    return f"{recipe.method} {' '.join(recipe.flags)} {recipe.structure}"


def incomplete_banner(measured: int, missing, noun: str) -> list[str]:
    """The lines that open a benchmark page written before all of its `noun` were measured; none when it is complete."""
    if not missing:
        return []
    return [f"**Incomplete: {measured} of {measured + len(missing)} {noun} measured.** Not yet measured: "
            f"{', '.join(missing)}. `--resume` measures them.", ""]


def goal_verdict(ratio: float, goal: float, moonshot: float) -> str:
    """A perplexity ratio against a goal and its (lower) moonshot, as the benchmark pages word it."""
    return "**met**, and the moonshot" if ratio <= moonshot else "**met**" if ratio <= goal else "**not met**"


def _equals(rows: list[dict], wiki: float) -> str:
    """'; equal to it within the rounding spread ...: ...' naming the rows within that spread of `wiki`, or ''."""
    close = [row for row in rows if _wiki(row) <= wiki * (1 + ROUNDING_SPREAD)]
    return (f"; equal to it within the rounding spread of one run (≤ {ROUNDING_SPREAD:.0%}, docs/determinism.md): "
            + ", ".join(f"{_label(_recipe(row))} ({_wiki(row):.2f})" for row in close)) if close else ""


def _verdict(change: float) -> str:
    return ("it helps" if change < -ROUNDING_SPREAD else "it does not help" if change > ROUNDING_SPREAD
            else f"within the rounding spread of one run (≤ {ROUNDING_SPREAD:.0%}), so not established")


def _recipe(row: dict) -> Recipe:
    return Recipe(**row["recipe"] | {"flags": tuple(row["recipe"]["flags"])})


def goal_lines(rows: list[dict]) -> list[str]:
    """The goals' verdicts from the measured rows: the best 2:4 recipe against SparseGPT's, block order on the fast
    default, and the rows --recipe fast and best name. Only what was measured is judged."""
    by_name = {row["name"]: row for row in rows}
    reference = by_name.get(SPARSEGPT.name)
    if reference is None:
        return []
    ppl, seconds = _wiki(reference), reference["report"]["total_seconds"]
    candidates = sorted((row for row in rows if row.get("recipe") and row["recipe"]["structure"] == "2:4"
                         and row["report"]["total_seconds"] <= TIME_LIMIT * seconds), key=_wiki)
    best = _recipe(candidates[0])
    ratio = _wiki(candidates[0]) / ppl
    verdict = goal_verdict(ratio, QUALITY_GOAL, MOONSHOT)
    lines = ["", "## Goals", "",
             f"- 2:4 at ≤ {QUALITY_GOAL}× SparseGPT's wiki perplexity ({ppl:.2f}; moonshot ≤ {MOONSHOT}×) within "
             f"{TIME_LIMIT:g}× its total time ({seconds:.0f} s): {verdict}. The best recipe within that time is {_label(best)}: "
             f"{_wiki(candidates[0]):.2f}, {ratio:.2f}× SparseGPT's, at {candidates[0]['report']['total_seconds'] / seconds:.2f}× "
             "its total time" + _equals(candidates[1:], _wiki(candidates[0])) + "."]
    fast, ordered = by_name.get(DEFAULT_RECIPE.name), by_name.get(Recipe("wanda", "2:4", ("--permute", "--block-order")).name)
    if fast and ordered:
        mask = ordered["report"]["mask_seconds"] / fast["report"]["mask_seconds"]
        change = _wiki(ordered) / _wiki(fast) - 1
        lines.append(f"- The fast default with block order: wiki perplexity {_wiki(fast):.2f} → {_wiki(ordered):.2f} ({change:+.1%}), "
                     f"mask time {mask:.2f}× ({'within' if mask <= FAST_MASK_LIMIT else '**over**'} the {FAST_MASK_LIMIT:g}× "
                     f"allowed); {_verdict(change)}.")
    for name, recipe in (("fast", DEFAULT_RECIPE), ("best", BEST_RECIPE)):
        if recipe.name in by_name:
            row = by_name[recipe.name]
            lines.append(f"- `--recipe {name}` is {_label(recipe)}: wiki {_wiki(row):.2f}, "
                         f"{_wiki(row) / ppl:.2f}× SparseGPT's, total {row['report']['total_seconds']:.0f} s.")
    return lines


if __name__ == "__main__":
    run_benchmark(main)
