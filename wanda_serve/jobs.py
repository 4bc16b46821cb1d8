"""The prune and eval jobs behind the CLI: load, calibrate, prune, evaluate, write a report."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wanda_serve.artifacts import atomic_output_dir, check_output_dir, package_versions
from wanda_serve.checkpoint import PruneCheckpoint, checkpoint_dir
from wanda_serve.contract import PRUNE_REPORT_NAME, EvalOptions
from wanda_serve.data import calibration_batches, evaluation_ids, load_corpus
from wanda_serve.engine import Owl, PruneOptions, Refine, block_linears, check_structure_fits, prune_model
from wanda_serve.errors import WandaServeError
from wanda_serve.evaluate import LogitsFn, perplexity, torch_logits_fn
from wanda_serve.methods import get_method
from wanda_serve.models import LoadedModel, check_context, load_model, save_model
from wanda_serve.structure import Structure, audit_linears

log = logging.getLogger(__name__)

# The main job's recovery budget: about 5 minutes of distillation for SmolLM2 on 2 CPU cores (~110 tokens/s),
# so that `make run` stays within about 30 minutes; 8k tokens already take its perplexity from 185 to 79.
RECOVER_TOKENS = 32_768


@dataclass
class PruneJob:
    out: Path
    model: str | None = None  # None: the embedded default model
    method: str = "wanda"
    structure: str = "2:4"
    reconstruct: bool = False  # the method's mask, then the OBS update of the surviving weights
    owl: Owl | None = None  # per-block ratios from outlier ratios (unstructured targets)
    permute: bool | None = None  # input-channel permutations folded in before an N:M mask; None: permutes_by_default
    block_order: bool = False  # prune each block stage by stage on the inputs of its pruned earlier stages
    refine: Refine | None = None  # fit each pruned block's surviving weights to the dense block's outputs
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    # Calibration samples per forward pass. A pass's own activations are the prune's largest transient (the MLP's
    # alone, 3 × batch × seqlen × intermediate × 4 B: 0.11 GB on the 1.5B model at 2, 0.44 GB at 8), and on a
    # 2-core EPYC 2 was faster than 8 (SmolLM2's forward passes 120 s against 138 s), with the same Wanda weights.
    batch_size: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    evaluation: EvalOptions | None = None  # None: skip perplexity before and after
    overwrite: bool = False
    progress: bool = True
    # Seconds between checkpoints (each taken after a block; a shorter prune takes none). None: no checkpoints, and
    # Ctrl-C stops at once, for callers that do not offer --resume (the main job).
    checkpoint_every: float | None = None
    resume: bool = False  # go on from the checkpoint an interrupted run left

    def checkpoint(self) -> PruneCheckpoint | None:
        """Everything that decides the pruned model and its report must be the same for a --resume."""
        if self.checkpoint_every is None:
            return None
        settings = {key: value for key, value in asdict(self).items()
                    if key not in ("out", "overwrite", "progress", "checkpoint_every", "resume")}
        return PruneCheckpoint(checkpoint_dir(self.out), settings, self.checkpoint_every, self.resume)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise WandaServeError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WandaServeError(f"device {name} requested but CUDA is not available to this torch ({torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise WandaServeError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


def peak_memory(device: torch.device) -> dict:
    # ru_maxrss is in KiB on Linux; it covers the whole process, model loading included.
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


class Evaluation:
    """The evaluation text, tokenized once, and the perplexity of a model on it."""

    def __init__(self, options: EvalOptions, loaded: LoadedModel, device: torch.device, progress: bool):
        check_context(loaded.model, "--eval-seqlen", options.seqlen)
        corpus = load_corpus(options.data)
        self.name, self.ids = corpus.name, evaluation_ids(corpus, loaded.tokenizer)
        self.options, self.device, self.progress = options, device, progress

    def perplexity(self, model) -> dict:
        result = self.measure(torch_logits_fn(model, self.device))
        model.to("cpu")
        return result

    def measure(self, logits_fn: LogitsFn) -> dict:
        """The perplexity of any runtime's logits (PyTorch, onnxruntime) on the evaluation text."""
        result = perplexity(logits_fn, self.ids, self.options.seqlen, self.options.max_windows, self.progress, self.name)
        return {"data": self.name, **result.to_dict()}


# Where docs/prune_benchmark.md shows permutation helping at 2:4 (wanda −11%, ria −6% perplexity, with or
# without reconstruction); it made magnitude and sparsegpt slightly worse.
PERMUTED_BY_DEFAULT = ("wanda", "ria")


def permutes_by_default(method: str, structure: Structure) -> bool:
    return structure.is_nm and method in PERMUTED_BY_DEFAULT


def recipe_name(report: dict) -> str:
    """The recipe a prune report describes, e.g. "wanda + permutation 2:4"."""
    return " ".join([report["method"], *(["+ permutation"] if report["permutation"] else []),
                     *(["+ reconstruction"] if report["reconstruct"] else []), *(["+ OWL"] if report["owl"] else []),
                     *(["+ block order"] if report.get("block_order") else []),
                     *([f"+ refine {report['refine']['steps']}"] if report.get("refine") else []), report["structure"]])


def run_prune(job: PruneJob) -> dict:
    """Prune job.model and write it, with prune_report.json, to job.out. Returns the report."""
    started = time.perf_counter()
    structure = Structure.parse(job.structure)
    method = get_method(job.method, job.reconstruct)
    permute = permutes_by_default(job.method, structure) if job.permute is None else job.permute
    if job.owl is not None:
        job.owl.check_applies(structure)
    device = resolve_device(job.device)
    check_output_dir(job.out, job.overwrite)  # before the checkpoints beside it are looked for
    checkpoint = job.checkpoint()
    # Before the model loads: a --resume that cannot go on says so at once.
    resumed = checkpoint.stored if checkpoint is not None else None
    with atomic_output_dir(job.out, job.overwrite) as tmp:
        loaded = load_model(job.model, job.dtype)
        check_structure_fits(loaded.model, structure)
        linears = block_linears(loaded.model)
        dense_params = sum(linear.weight.numel() for linear in linears.values())

        calibration = {"used": False}
        batches = []
        if method.statistic is not None or job.owl is not None or permute or job.refine is not None:
            check_context(loaded.model, "--seqlen", job.seqlen)
            corpus = load_corpus(job.calib)
            batches = calibration_batches(corpus, loaded.tokenizer, job.nsamples, job.seqlen, job.seed, job.batch_size)
            calibration = {
                "used": True, "source": corpus.name, "nsamples": job.nsamples, "seqlen": job.seqlen,
                "seed": job.seed, "tokens": sum(b.numel() for b in batches),
            }

        evaluation = Evaluation(job.evaluation, loaded, device, job.progress) if job.evaluation else None
        if resumed is not None:
            before = resumed["job"]["dense_perplexity"]
        else:
            before = evaluation.perplexity(loaded.model) if evaluation else None
        options = PruneOptions(owl=job.owl, permute=permute, block_order=job.block_order, refine=job.refine)
        if checkpoint is not None:
            checkpoint.job["dense_perplexity"] = before
        with checkpoint.interrupt if checkpoint is not None else nullcontext():
            record = prune_model(loaded.model, batches, method, structure, options, device, job.progress, checkpoint)
        after = evaluation.perplexity(loaded.model) if evaluation else None

        save_model(loaded, tmp)
        report = {
            "method": job.method,
            "reconstruct": job.reconstruct,
            "owl": asdict(job.owl) | {"block_sparsity": record.block_sparsity} if job.owl else None,
            "permutation": {"layers": record.permutations} if permute else None,
            "block_order": {"stages": record.stages} if job.block_order else None,
            "refine": asdict(job.refine) | {"blocks": record.refined} if job.refine else None,
            "structure": str(structure),
            "structure_meaning": f"{structure.n} of every {structure.m} consecutive input weights of a row are zero"
            if structure.is_nm else f"{structure.ratio:g} of each output row's weights are zero",
            "tie_rule": "stable ascending sort: among equal scores the lower input column is pruned first",
            "model": {
                "source": loaded.source,
                # A local directory's absolute path, for those who read the report elsewhere (recover's teacher):
                # a relative `source` names it only from where the prune ran.
                "path": str(Path(loaded.source).resolve()) if Path(loaded.source).is_dir() else None,
                "architecture": type(loaded.model).__name__,
                "dtype": job.dtype,
                "parameters": sum(p.numel() for p in loaded.model.parameters()),
                "pruned_linear_parameters": dense_params,
                "decoder_blocks": len({name.split(".")[0] for name in linears}),
            },
            "calibration": calibration,
            "device": str(device),
            "mask_seconds": record.mask_seconds,
            "forward_seconds": record.forward_seconds,
            "total_seconds": time.perf_counter() - started,
            "resumed_from_block": resumed["next_block"] if resumed is not None else None,
            "memory": peak_memory(device),
            "perplexity": {"dense": before, "pruned": after} if job.evaluation else None,
            "sparsity": audit_linears(linears, structure),
            "versions": package_versions(),
        }
        (tmp / PRUNE_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if checkpoint is not None:
        shutil.rmtree(checkpoint.directory, ignore_errors=True)  # the output is complete; nothing left to resume
    return report


def run_eval(model: str | None, options: EvalOptions, device: str = "cpu", structure: str | None = None, progress: bool = True) -> dict:
    """Perplexity and a sparsity audit of a model, as it is on disk."""
    device = resolve_device(device)
    loaded = load_model(model)
    audit = audit_linears(block_linears(loaded.model), Structure.parse(structure) if structure else None)
    return {
        "model": loaded.source,
        "perplexity": Evaluation(options, loaded, device, progress).perplexity(loaded.model),
        "sparsity": audit,
        "eval_options": asdict(options),
        "versions": package_versions(),
    }
