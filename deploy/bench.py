"""Benchmark the pruned model against the dense one on real vLLM servers, side by side.

Both models get exactly the same requests; with the sparse runtime, the pruned model is served a
second way (wanda-serve's vLLM plugin, deploy/vllm_plugin.py) as a third column. Rounds alternate
(dense, pruned, [sparse runtime,] dense, pruned, ...) so that drift of the machine over time favours
none, and each round sends distinct prompts so vLLM's prefix cache never answers a prompt it has
seen. Per concurrency level the rounds are pooled: throughput is completed work over the summed wall
time, latency percentiles are over all requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from transformers import AutoTokenizer

from deploy.client import Endpoint, Request, ServerRequestFailed, run_level, served_model
from deploy.greedy_check import MAX_LOGPROB_GAP, check_greedy
from deploy.metrics import RequestOutput
from deploy.report import write_plots, write_summary
from deploy.results import BenchResults, LevelResult
from deploy.vllm_server import ServerFailed, ServerSettings, VllmServer
from deploy.workload import CONCURRENCY_LEVELS, ROUNDS, WorkloadSpec, build_requests, write_custom_dataset
from wanda_serve.artifacts import atomic_output_dir, package_versions, read_json_file
from wanda_serve.contract import MANIFEST_NAME, PRUNE_REPORT_NAME, RECOVER_REPORT_NAME, RESULTS_NAME
from wanda_serve.errors import WandaServeError

log = logging.getLogger(__name__)

SPARSE_RUNTIME = "sparse-runtime"  # the label of the pruned model served on the 2:4 kernels


@dataclass
class BenchSettings:
    """How the models are measured against each other: the same in `bench` and in the main job."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    concurrency: tuple[int, ...] = CONCURRENCY_LEVELS
    rounds: int = ROUNDS
    server: ServerSettings = field(default_factory=ServerSettings)
    hour_price: float | None = None  # dollars per hour of the hardware serving one model
    sparse_runtime: bool = False  # a third column: the pruned directory served with the sparse runtime

    def __post_init__(self):
        if self.rounds < 1:
            raise WandaServeError(f"rounds must be at least 1, got {self.rounds}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise WandaServeError(f"concurrency levels must be positive integers, got {list(self.concurrency)}")


@dataclass
class BenchJob:
    out: Path
    dense: str  # a vLLM-loadable directory to serve, or the URL of a running server
    pruned: str
    settings: BenchSettings = field(default_factory=BenchSettings)
    greedy_check: bool = True
    tokenizer: str | None = None  # default: the dense checkpoint's
    overwrite: bool = False

    def __post_init__(self):
        if self.settings.sparse_runtime and is_url(self.pruned):
            raise WandaServeError("the sparse runtime column needs --pruned to be a directory: the runtime is chosen "
                                  "when wanda-serve starts the server")


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@dataclass
class _Target:
    label: str
    spec: str
    checkpoint: Path | None  # local files of the model, for the greedy check and its reports
    sparse_runtime: bool = False


def _resolve_target(label: str, spec: str, api_key: str | None, sparse_runtime: bool = False) -> _Target:
    if is_url(spec):
        root = Path(served_model(spec.rstrip("/"), api_key).get("root", ""))
        return _Target(label, spec.rstrip("/"), root if (root / "config.json").is_file() else None)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise WandaServeError(f"--{label}: {spec} is neither a model directory (no config.json) nor a server URL")
    return _Target(label, spec, path, sparse_runtime)


@contextlib.contextmanager
def _endpoint(target: _Target, settings: ServerSettings, log_path: Path) -> Iterator[tuple[Endpoint, VllmServer | None]]:
    """The target's endpoint: its running server, or a server started (and stopped afterwards) for it."""
    if is_url(target.spec):
        yield Endpoint(target.spec, served_model(target.spec, settings.api_key)["id"], settings.api_key), None
        return
    settings = dataclasses.replace(settings, sparse_runtime=target.sparse_runtime)
    with VllmServer(target.checkpoint, log_path, settings) as server:
        yield Endpoint(server.base_url, server.model_name, settings.api_key), server


@contextlib.contextmanager
def _keep_log_on_failure(out: Path) -> Iterator[list[Path]]:
    """If a server fails, copy its log beside `out`: the unfinished run directory is removed, the log is needed."""
    log_paths: list[Path] = []
    try:
        yield log_paths
    except ServerFailed as e:
        if not log_paths or not log_paths[-1].is_file():
            raise
        kept = out.with_name(f"{out.name}-failed-server.log")
        shutil.copyfile(log_paths[-1], kept)
        raise ServerFailed(f"{e}\n(full log: {kept})") from e


def _test_request(endpoint: Endpoint, request: Request, label: str) -> None:
    (output,), _ = run_level(endpoint, [request], 1)
    if not output.success:
        raise WandaServeError(f"the {label} server at {endpoint.base_url} failed a test request before the benchmark: {output.error}")


def quality(checkpoint: Path | None) -> dict | None:
    """Perplexities recorded for a checkpoint: its prune report's, found directly or through its export manifest.

    A recovered model (wanda-serve recover) is measured again after recovery on the same text: that is
    its perplexity, and the prune report's is kept as `pruned_before_recovery`.
    """
    if checkpoint is None:
        return None
    if (checkpoint / PRUNE_REPORT_NAME).is_file():
        report = read_json_file(checkpoint / PRUNE_REPORT_NAME)
        recovery = read_json_file(checkpoint / RECOVER_REPORT_NAME) if (checkpoint / RECOVER_REPORT_NAME).is_file() else None
    elif (checkpoint / MANIFEST_NAME).is_file():
        manifest = read_json_file(checkpoint / MANIFEST_NAME)
        report, recovery = manifest.get("source_prune_report"), manifest.get("source_recover_report")
    else:
        return None
    if not report or not report.get("perplexity"):
        return None
    measured = {"method": report.get("method"), "structure": report.get("structure"), **report["perplexity"]}
    pruned_data = (report["perplexity"].get("pruned") or {}).get("data")
    after = [ppl["after"] for ppl in (recovery or {}).get("perplexity", {}).values() if ppl["after"]["data"] == pruned_data]
    if after:
        measured |= {"pruned": after[0], "pruned_before_recovery": measured["pruned"], "recovery_tokens": recovery["tokens"]}
    return measured


def _perplexities(dense: _Target, pruned: _Target) -> dict:
    """Perplexity of each model: the pruned model's report also measured its dense source on the same text.

    The sparse runtime serves the pruned weights: its quality is the pruned one's (its greedy check says
    whether the kernels keep it).
    """
    pruned_quality, dense_quality = quality(pruned.checkpoint) or {}, quality(dense.checkpoint) or {}
    return {
        "dense": dense_quality.get("pruned") or pruned_quality.get("dense"),
        "pruned": pruned_quality.get("pruned"),
        **{key: pruned_quality[key] for key in ("pruned_before_recovery", "recovery_tokens") if key in pruned_quality},
    }


def _load_tokenizer(tokenizer: str | None, dense_checkpoint: Path | None):
    """The prompts' tokenizer: --tokenizer's directory, else the dense checkpoint's."""
    if tokenizer is None:
        if dense_checkpoint is None:
            raise WandaServeError("the dense server's model files are not on this machine; give --tokenizer")
        option, source, hint = "--dense", dense_checkpoint, "; give --tokenizer DIR"
    else:
        option, source, hint = "--tokenizer", Path(tokenizer), ""
        if not source.is_dir():
            raise WandaServeError(f"--tokenizer: {tokenizer} is not a directory")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # transformers' errors for missing or unusable tokenizer files
        raise WandaServeError(f"{option}: {source} has no tokenizer that transformers can load{hint}") from e


def run_bench(job: BenchJob) -> BenchResults:
    """Benchmark both models, write the run directory (JSON, Markdown, plots, logs); return the results."""
    settings = job.settings
    api_key = settings.server.api_key
    targets = [_resolve_target("dense", job.dense, api_key), _resolve_target("pruned", job.pruned, api_key)]
    if settings.sparse_runtime:
        targets.append(_resolve_target(SPARSE_RUNTIME, job.pruned, api_key, sparse_runtime=True))
    labels = [target.label for target in targets]
    tokenizer = _load_tokenizer(job.tokenizer, targets[0].checkpoint)
    levels = list(settings.concurrency)
    per_level = settings.workload.num_prompts
    *requests, test_request = build_requests(settings.workload, tokenizer, settings.rounds * len(levels) * per_level + 1)

    def level_requests(round_index: int, level_index: int) -> list[Request]:
        start = (round_index * len(levels) + level_index) * per_level
        return requests[start:start + per_level]

    with atomic_output_dir(job.out, job.overwrite) as tmp:
        write_custom_dataset(requests, tokenizer, tmp / "workload.jsonl")
        rounds: dict[tuple[str, int], list[tuple[list[RequestOutput], float]]] = {}
        models: dict[str, dict] = {}
        trace = (tmp / "requests.jsonl").open("w")
        with trace, _keep_log_on_failure(job.out) as log_paths:
            for round_index in range(settings.rounds):
                for target in targets:
                    log_path = tmp / "logs" / f"{target.label}-round{round_index + 1}.log"
                    log_paths.append(log_path)
                    with _endpoint(target, settings.server, log_path) as (endpoint, server):
                        if target.label not in models:
                            models[target.label] = _describe(target, endpoint, server, tokenizer, job.greedy_check)
                        _test_request(endpoint, test_request, target.label)  # not a measured prompt: no cache hit later
                        for level_index, level in enumerate(levels):
                            log.info("round %d, %s, concurrency %d", round_index + 1, target.label, level)
                            level_outputs, duration = run_level(endpoint, level_requests(round_index, level_index), level)
                            if server is not None:
                                server.check_alive()
                            rounds.setdefault((target.label, level), []).append((level_outputs, duration))
                            for output in level_outputs:
                                trace.write(json.dumps({"model": target.label, "round": round_index + 1,
                                                        "max_concurrency": level, **asdict(output)}) + "\n")
        results = BenchResults(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            workload=asdict(settings.workload) | {"rounds": settings.rounds, "requests_per_level_and_round": per_level,
                                                  "sampling": "greedy, end-of-sequence ignored"},
            concurrency=tuple(levels),
            models=models,
            perplexity=_perplexities(*targets[:2]),
            hour_price=settings.hour_price,
            levels={label: [LevelResult.pooled(rounds[label, level], level, settings.hour_price) for level in levels] for label in labels},
            versions=package_versions(),
        )
        (tmp / RESULTS_NAME).write_text(json.dumps(results.to_json(), indent=2) + "\n")
        write_summary(results, tmp / "summary.md")
        write_plots(results, tmp)
    return results


def _describe(target: _Target, endpoint: Endpoint, server: VllmServer | None, tokenizer, greedy_check: bool) -> dict:
    described = {"spec": target.spec, "served_as": endpoint.model,
                 "checkpoint": str(target.checkpoint) if target.checkpoint else None}
    if server is not None:
        described["vllm"] = server.build
        described["command"] = server.shown_command("python")
        if target.sparse_runtime:
            described["sparse_runtime"] = server.sparse_plan()
    if not greedy_check:
        described["greedy_check"] = {"passed": None, "skipped": "--no-greedy-check"}
    elif target.checkpoint is None:
        described["greedy_check"] = {"passed": None, "skipped": "the server's model files are not on this machine"}
    else:
        try:
            described["greedy_check"] = check_greedy(endpoint, target.checkpoint, tokenizer)
        except ServerRequestFailed as e:
            raise WandaServeError(f"the {target.label} server failed the greedy check request: {e}") from e
        if not described["greedy_check"]["passed"]:
            gap = described["greedy_check"]["max_logprob_gap"]
            raise WandaServeError(
                f"the {target.label} server does not compute what its checkpoint does: a token it chose greedily is "
                f"{gap:.2f} nats below transformers' choice on the same files (allowed: {MAX_LOGPROB_GAP}); "
                "not benchmarking a broken model")
    return described

