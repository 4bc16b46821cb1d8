"""What an export's own checks found, read from its manifest, as the benchmark pages show it."""

from __future__ import annotations

from dataclasses import dataclass

from exporters.gguf_export import logits_tolerance_text


@dataclass(frozen=True)
class ExportCheck:
    text: str  # one table cell
    zeros_kept: bool  # every pruned zero of the source is still zero in the export
    passed: bool  # zeros kept, and every check the export requires of its precision passed


def _agreeing(counts: list[int]) -> str:
    return " and ".join(map(str, counts))


def export_checks(kind: str, manifest: dict) -> ExportCheck:
    """The checks of a `wanda-serve export KIND` from its manifest (for gguf, the manifest beside the file)."""
    if kind == "vllm":
        checks, zeros = manifest["checks"], manifest["zeros_kept"]
        diff, vllm = checks["transformers_reload_max_abs_logit_diff"], checks["vllm"]["status"]
        kept = zeros["kept"] == zeros["source"]
        return ExportCheck(f"reload max abs logit diff {diff:g}; vLLM greedy (float32) {vllm}; zeros kept {zeros['kept']:,} of "
                           f"{zeros['source']:,}", kept, kept and diff == 0 and vllm == "passed")
    if kind == "onnx":
        variants, kept = manifest["variants"], bool(manifest["zeros"]["kept"])
        graph = variants["model.onnx"]["check"]
        quantized = "".join(f"; {name}: greedy tokens agreeing {_agreeing(variant['check']['greedy_tokens_agreeing'])}"
                            for name, variant in variants.items() if name != "model.onnx")
        return ExportCheck(f"model.onnx vs PyTorch: max abs logit diff {graph['max_abs_logit_diff']:.1e}, greedy equal: "
                           f"{'yes' if graph['greedy_equal'] else 'no'}{quantized}; zeros kept: {'yes' if kept else 'NO'}",
                           kept, kept and bool(graph["greedy_equal"]))
    if kind == "ort-genai":
        zeros, checks = manifest["zeros"], manifest["checks"]
        greedy, kept = checks["greedy"], bool(zeros["kept"])
        count = f"all {zeros['source_zeros']:,}" if kept else f"{zeros['pruned_not_zero']:,} of {zeros['source_zeros']:,} NOT zero"
        exact = not checks["greedy_must_equal"] or greedy["greedy_equal"]  # fp32 must; int4 and fp16 report agreement
        return ExportCheck(f"greedy tokens agreeing with PyTorch fp32: {_agreeing(greedy['greedy_tokens_agreeing'])} of "
                           f"{greedy['tokens']}, max log-prob gap {greedy['max_log_prob_gap']:.2g}; pruned zeros kept: {count}",
                           kept, kept and exact)
    if kind == "gguf":
        checks = manifest["checks"]
        logits, zeros, greedy = checks["logits"], checks["zeros"], checks["greedy"]
        kept = bool(zeros["kept"])
        return ExportCheck(f"read back: logits within {logits['relative_diff']:.2%} of the largest "
                           f"({logits_tolerance_text(logits['tolerance'])}), greedy tokens agreeing "
                           f"{_agreeing(greedy['tokens_agreeing'])} of {greedy['tokens']}; zeros kept {zeros['zeros_kept']:,} of "
                           f"{zeros['source_zeros']:,}", kept, kept and checks["weights"]["passed"] and logits["passed"] is not False)
    raise ValueError(f"no export kind {kind!r}")
