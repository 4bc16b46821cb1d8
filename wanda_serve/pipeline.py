"""The main job: prune, evaluate, export for vLLM and ONNX, serve dense and pruned, benchmark, report.

It only composes the stages (wanda_serve prunes, exporters convert, deploy serves and measures);
each stage writes its own directory inside the run directory, atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from deploy.bench import SPARSE_RUNTIME, BenchJob, BenchSettings, run_bench
from deploy.report import model_table
from deploy.results import BenchResults
from exporters.gguf_export import GgufExport, export_gguf
from exporters.onnx_export import GRAPH_NAME, OnnxExport, export_onnx
from exporters.ort_genai import OrtGenaiExport, export_ort_genai
from exporters.vllm_checkpoint import VllmExport, export_vllm
from wanda_serve.artifacts import replacing_dir, write_file_atomically
from wanda_serve.contract import RESULTS_NAME
from wanda_serve.errors import WandaServeError
from wanda_serve.jobs import RECOVER_TOKENS, PruneJob, recipe_name, run_prune
from wanda_serve.recover import RecoverJob, run_recover

RUN_REPORT_NAME = "REPORT.md"


@dataclass(frozen=True)
class EdgeExport:
    """An export of the served model for an edge runtime, besides vLLM's: where it goes, how it is made,
    and its row in REPORT.md."""

    path: str  # in the run directory
    export: Callable[[Path, str], dict]  # (destination, model directory) -> its manifest
    result: Callable[[dict], str]  # manifest -> the report row's result


def _onnx_result(manifest: dict) -> str:
    check = manifest["variants"][GRAPH_NAME]["check"]
    return (f"max abs logit diff vs PyTorch {check['max_abs_logit_diff']:.1e}, "
            f"greedy equal: {'yes' if check['greedy_equal'] else 'no'}")


def _ort_genai_result(manifest: dict) -> str:
    greedy, zeros = manifest["checks"]["greedy"], manifest["zeros"]
    return (f"{manifest['builder']['precision']} on onnxruntime-genai; greedy tokens agreeing with PyTorch (of 32): "
            f"{', '.join(map(str, greedy['greedy_tokens_agreeing']))}; pruned weights no longer zero: {zeros['pruned_not_zero']}")


def _gguf_result(manifest: dict) -> str:
    logits, zeros = manifest["checks"]["logits"], manifest["checks"]["zeros"]
    return (f"{manifest['type']['name']}, {manifest['file']['bytes'] / 1e6:.0f} MB; read back: max logit diff {logits['relative_diff']:.2%} "
            f"of the largest, pruned zeros kept: {zeros['zeros_kept']} of {zeros['source_zeros']}")


EDGE_EXPORTS = {
    "onnx": EdgeExport("onnx-pruned", lambda out, model: export_onnx(OnnxExport(out, model)), _onnx_result),
    "ort-genai": EdgeExport("ort-genai-pruned", lambda out, model: export_ort_genai(OrtGenaiExport(out, model)), _ort_genai_result),
    "gguf": EdgeExport("pruned.gguf", lambda out, model: export_gguf(GgufExport(out, model)), _gguf_result),
}


@dataclass
class MainJob:
    out: Path
    prune: PruneJob  # the model, recipe and evaluation; it writes to out/pruned, whatever its own out says
    export_dtype: str = "bfloat16"  # of the vLLM checkpoints
    bench: BenchSettings = field(default_factory=BenchSettings)
    overwrite: bool = False
    recover_tokens: int | None = RECOVER_TOKENS  # distil the pruned model before exporting it; None: serve it as pruned
    edge_exports: tuple[str, ...] = ("onnx",)  # keys of EDGE_EXPORTS, exported after vLLM's in this order

    def __post_init__(self):
        unknown = [name for name in self.edge_exports if name not in EDGE_EXPORTS]
        if unknown:
            raise WandaServeError(f"unknown export {', '.join(unknown)}: choose from {', '.join(EDGE_EXPORTS)}")


def run_main_job(job: MainJob) -> Path:
    """Run every stage into job.out; returns the path of the run's REPORT.md.

    An older run in job.out (--overwrite) survives a failed one. When job.out held no run, a failure
    after the first stage keeps the finished stages there, without REPORT.md.
    """
    # Built first so that bad benchmark settings fail now, not after pruning and exporting.
    bench_job = BenchJob(out=job.out / "bench", dense=str(job.out / "vllm-dense"), pruned=str(job.out / "vllm-pruned"),
                         settings=job.bench)
    replacing = job.out.is_dir() and any(job.out.iterdir())
    started = time.perf_counter()
    stage = "prune"
    try:
        with replacing_dir(job.out, job.overwrite):
            prune = run_prune(replace(job.prune, out=job.out / "pruned", overwrite=False))
            served, recovery = job.out / "pruned", None
            if job.recover_tokens:
                stage = "recover"
                # The prune report holds the dense and pruned perplexities on the same windows: not measured again.
                recovery = run_recover(RecoverJob(out=job.out / "recovered", pruned=str(served), tokens=job.recover_tokens,
                                                  evaluation=job.prune.evaluation, out_of_domain=None, reference=False))
                served = job.out / "recovered"
            stage = "export vllm"
            dense_export = export_vllm(VllmExport(job.out / "vllm-dense", job.prune.model, job.export_dtype))
            pruned_export = export_vllm(VllmExport(job.out / "vllm-pruned", str(served), job.export_dtype))
            edge = {}
            for name in job.edge_exports:
                stage = f"export {name}"
                edge[name] = EDGE_EXPORTS[name].export(job.out / EDGE_EXPORTS[name].path, str(served))
            stage = "bench"
            bench = run_bench(bench_job)
            write_file_atomically(job.out / RUN_REPORT_NAME, _report(job, prune, recovery, dense_export, pruned_export, edge, bench,
                                                                   time.perf_counter() - started))
    except (WandaServeError, KeyboardInterrupt) as e:
        if replacing:
            kept = f"nothing was written; the previous run in {job.out} is unchanged"
        else:
            kept = f"finished stages are kept in {job.out}" if stage != "prune" else "nothing was written"
        reason = str(e) if isinstance(e, WandaServeError) else "interrupted"
        raise WandaServeError(f"stage {stage}: {reason}\n({kept})") from e
    return job.out / RUN_REPORT_NAME


def _report(job: MainJob, prune: dict, recovery: dict | None, dense_export: dict, pruned_export: dict, edge: dict[str, dict], bench: BenchResults,
            seconds: float) -> str:
    ppl = prune["perplexity"]
    exported = pruned_export["sparsity"]["exported"]
    lines = [
        f"# wanda-serve run: {prune['model']['source']}, {recipe_name(prune)}",
        "",
        f"Finished in {seconds / 60:.1f} minutes. Every stage's directory holds its own report.",
        "",
        "| stage | directory | result |",
        "|---|---|---|",
        f"| prune | `pruned/` | {recipe_name(prune)}: perplexity {ppl['dense']['perplexity']:.2f} → "
        f"{ppl['pruned']['perplexity']:.2f} on {ppl['pruned']['data']} ({ppl['pruned']['windows']} × {ppl['pruned']['seqlen']} tokens); "
        f"masks {prune['mask_seconds']:.1f} s of {prune['total_seconds']:.0f} s |",
        *([_recovery_row(recovery)] if recovery else []),
        f"| export vLLM | `vllm-dense/`, `vllm-pruned/` | {job.export_dtype}; pruned sparsity {exported['overall_sparsity']:.3f}, "
        + ", ".join(f"{p} valid: {'yes' if ok else 'no'}" for p, ok in exported["all_nm_valid"].items())
        + f"; vLLM greedy check: dense {dense_export['checks']['vllm']['status']}, pruned {pruned_export['checks']['vllm']['status']} |",
        *(f"| export {name} | `{EDGE_EXPORTS[name].path}` | {EDGE_EXPORTS[name].result(manifest)} |" for name, manifest in edge.items()),
        f"| bench | `bench/` | [summary](bench/summary.md), [{RESULTS_NAME}](bench/{RESULTS_NAME}) |",
        "",
        "## Serving: against dense on vLLM",
        "",
        *model_table(bench),
    ]
    plan = bench.models.get(SPARSE_RUNTIME, {}).get("sparse_runtime")
    lines += [
        "",
        "Stock vLLM has no 2:4 kernels since 2026, so the pruned checkpoint (dense storage, zeros) is expected to serve "
        "at dense speed: ratios near 1 are the honest answer, and the quality cost is the perplexity above.",
        *(["", f"Sparse runtime: {plan['description']}."] if plan else []),
        "",
        "![throughput](bench/throughput.png)",
        "",
        "![latency](bench/latency.png)",
        "",
    ]
    return "\n".join(lines)


def _recovery_row(recovery: dict) -> str:
    (ppl,) = recovery["perplexity"].values()  # in domain only: the main job measures no second text
    return (f"| recover | `recovered/` | distilled from {recovery['teacher']} on {recovery['tokens']} tokens in "
            f"{recovery['train_seconds']:.0f} s ({recovery['tokens_per_second']:.0f} tokens/s): perplexity "
            f"{ppl['after']['perplexity']:.2f}; mask identical: {'yes' if recovery['mask_check']['passed'] else 'no'}. "
            "The exports and servers below are of this model |")
