"""Pruned (or any) causal LM -> a Hugging Face directory that current vLLM loads as it is.

vLLM removed its Sparse24 kernels and refuses checkpoints whose config carries a
`sparsity_config`, so the export is a plain dense checkpoint whose pruned weights are zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM

from exporters.verify import (
    ExportCheckFailed, cast_parameters, file_digests, prompt_batch, release_memory, torch_greedy,
    torch_logits,
)
from exporters.vllm_engine import vllm_greedy
from wanda_serve.artifacts import atomic_output_dir, package_versions, read_json_file
from wanda_serve.contract import MANIFEST_NAME, PRUNE_REPORT_NAME, PROMPTS, RECOVER_REPORT_NAME, VLLM_PYTHON_ENV, vllm_python
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.models import DTYPES, load_model, save_model
from wanda_serve.structure import audit_linears


@dataclass
class VllmExport:
    out: Path
    model: str | None = None  # None: the embedded default model
    dtype: str = "bfloat16"
    max_shard_size: int | str = "4GB"  # bytes, or what transformers' save_pretrained takes ("4GB")
    overwrite: bool = False
    vllm_check: bool = True  # greedy continuation from vLLM's offline engine, where vLLM is installed


def strip_sparsity_metadata(config) -> list[str]:
    """Remove the sparsity/compression metadata vLLM refuses; what was removed, for the manifest.

    Only metadata describing dense-stored weights can go: compressed weights or real quantization
    would then load wrong, so those are refused.
    """
    stripped = []
    sparsity = getattr(config, "sparsity_config", None)
    if sparsity is not None:
        _require_dense_format(sparsity, "sparsity_config")
        del config.sparsity_config
        stripped.append("sparsity_config")
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        if quantization.get("config_groups") or quantization.get("quant_method") != "compressed-tensors":
            raise WandaServeError(
                f"the source is quantized ({quantization.get('quant_method')}); export a dense or pruned full-precision model"
            )
        _require_dense_format(quantization.get("sparsity_config") or {}, "quantization_config.sparsity_config")
        del config.quantization_config
        stripped.append("quantization_config (compressed-tensors, sparsity only)")
    return stripped


def _require_dense_format(sparsity: dict, where: str) -> None:
    sparsity = sparsity if isinstance(sparsity, dict) else vars(sparsity)
    if sparsity.get("format", "dense") != "dense":
        raise WandaServeError(f"{where} says the weights are stored as {sparsity['format']!r}; only dense-stored weights can be exported")


def _zero_masks(linears) -> dict[str, np.ndarray]:
    """Bit-packed positions of each layer's zeros (1 bit per weight)."""
    return {name: np.packbits((linear.weight == 0).numpy().ravel()) for name, linear in linears.items()}


def _count_bits(masks) -> int:
    return int(sum(np.unpackbits(mask).sum(dtype=np.int64) for mask in masks))


# What the manifest keeps of the reports found beside the source: how it was pruned, and (after
# `wanda-serve recover`) how it was recovered.
SOURCE_REPORTS = {
    "source_prune_report": (PRUNE_REPORT_NAME, ("method", "structure", "calibration", "perplexity", "versions")),
    "source_recover_report": (RECOVER_REPORT_NAME, ("teacher", "tokens", "steps", "perplexity", "mask_check")),
}


def _source_reports(location: str) -> dict[str, dict | None]:
    reports = {}
    for field, (name, keys) in SOURCE_REPORTS.items():
        path = Path(location) / name
        report = read_json_file(path) if path.is_file() else None
        reports[field] = {key: report.get(key) for key in keys} | {"path": str(path)} if report else None
    return reports


def check_on_vllm(directory: Path, tokenizer) -> dict:
    """vLLM's offline engine must continue the fixed prompts exactly as transformers does, from the same files.

    Both run in float32: in bf16 the two runtimes' kernels round differently, near-tied tokens flip
    and vLLM's answer even depends on what else is in its batch, which says nothing about the export.
    """
    python = vllm_python()
    if python is None:
        return {"status": f"skipped (vLLM is not installed; set {VLLM_PYTHON_ENV} to a Python that has it)"}
    expected = torch_greedy(load_model(str(directory), "float32").model, tokenizer)  # freed before vLLM starts
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    try:
        got = vllm_greedy(python, directory, "float32", prompts, len(expected[0]))
    except RuntimeError as e:
        return {"status": "failed", "reason": str(e)}
    if got != expected:
        return {"status": "failed", "reason": f"vLLM's greedy continuation differs from transformers': {got} != {expected}"}
    return {"status": "passed", "compared_in": "float32", "greedy": got}


def export_vllm(job: VllmExport) -> dict:
    """Write job.model as a vLLM-loadable checkpoint in job.dtype, verified; returns the manifest.

    At most one copy of the weights is alive at a time: the source, loaded in its own dtype and cast
    in place (the source's zeros and N:M are counted before the cast), is freed once written and its
    logits taken; the files are then reloaded on their own and must give the same logits. The zero
    masks are freed with that reload, before the vLLM check loads the weights once more in float32.
    """
    if job.dtype not in DTYPES:
        raise WandaServeError(f"unknown dtype {job.dtype!r}; choose from {', '.join(DTYPES)}")
    with atomic_output_dir(job.out, job.overwrite) as tmp:
        stripped: list[str] = []
        loaded = load_model(job.model, "auto", edit_config=lambda config: stripped.extend(strip_sparsity_metadata(config)))
        source, tokenizer = loaded.source, loaded.tokenizer
        source_reports = _source_reports(loaded.location)  # read first: a damaged report fails before the work
        source_audit = audit_linears(block_linears(loaded.model))
        source_zeros = _zero_masks(block_linears(loaded.model))

        cast_parameters(loaded.model, DTYPES[job.dtype])
        batch = prompt_batch(tokenizer)
        expected_logits = torch_logits(loaded.model, batch)
        save_model(loaded, tmp, job.max_shard_size)
        del loaded
        release_memory()

        exported_audit, zeros_kept, logits_diff = _check_reload(tmp, DTYPES[job.dtype], source_audit, source_zeros,
                                                                expected_logits, batch)
        del source_zeros  # a bit per weight, 0.2 GB at 1.5B: gone before the vLLM check reloads the weights in float32
        release_memory()

        vllm_check = check_on_vllm(tmp, tokenizer) if job.vllm_check else {"status": "skipped (--no-vllm-check)"}
        if vllm_check["status"] == "failed":
            raise ExportCheckFailed(f"export check failed: {vllm_check['reason']}")

        manifest = {
            "format": "Hugging Face safetensors checkpoint for vLLM (dense; pruned weights are zeros)",
            "source": source,
            **source_reports,
            "dtype": job.dtype,
            "stripped_metadata": stripped,
            "files": file_digests(tmp),
            "sparsity": {"source": _summary(source_audit), "exported": exported_audit},
            # Counted on the reloaded files: weights zero in the source, and of those still zero in the export.
            "zeros_kept": zeros_kept,
            "checks": {
                "transformers_reload_max_abs_logit_diff": logits_diff,
                "vllm": vllm_check,
            },
            "versions": package_versions(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_reload(directory: Path, dtype, source_audit: dict, source_zeros: dict[str, np.ndarray],
                  expected_logits, batch) -> tuple[dict, dict, float]:
    """The written files, loaded on their own, keep every zero and N:M pattern of the source and give its logits
    exactly; their audit, the zeros kept and the logits' difference. The reloaded model and its masks are freed on
    return."""
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    exported_linears = block_linears(reloaded)
    exported_audit = audit_linears(exported_linears)
    exported_zeros = _zero_masks(exported_linears)
    lost_zeros = [name for name, mask in source_zeros.items() if np.any(mask & ~exported_zeros[name])]
    zeros_kept = {"source": _count_bits(source_zeros.values()),
                  "kept": _count_bits(mask & exported_zeros[name] for name, mask in source_zeros.items())}
    lost_patterns = [p for p, ok in source_audit["all_nm_valid"].items() if ok and not exported_audit["all_nm_valid"][p]]
    if lost_zeros or lost_patterns:
        raise ExportCheckFailed(f"export check failed: zeros lost in {lost_zeros[:3]}, N:M lost: {lost_patterns}")
    logits_diff = float((expected_logits - torch_logits(reloaded, batch)).abs().max())
    if logits_diff != 0.0:
        raise ExportCheckFailed(f"export check failed: the reloaded checkpoint's logits differ by {logits_diff:g}")
    return exported_audit, zeros_kept, logits_diff


def _summary(audit: dict) -> dict:
    return {"overall_sparsity": audit["overall_sparsity"], "all_nm_valid": audit["all_nm_valid"]}
