"""`wanda-serve export`: one command per runtime, each a thin layer over its exporter."""

from __future__ import annotations

from pathlib import Path

import click

from exporters.gguf_export import TYPES as GGUF_TYPES
from exporters.gguf_export import GgufExport, export_gguf, logits_tolerance_text
from exporters.onnx_export import OnnxExport, export_onnx
from exporters.ort_genai import ACCURACY_LEVELS, INT8_LAYERS, OrtGenaiExport, export_ort_genai
from exporters.vllm_checkpoint import VllmExport, export_vllm
from wanda_serve.cli_options import ByteSizeType, check_out_apart, eval_options, user_errors_as_one_line
from wanda_serve.contract import EvalOptions


@click.group()
def export():
    """Export a model for a runtime: `export vllm`, `export onnx`, `export ort-genai`, `export gguf`."""


@export.command("vllm")
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint directory.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--max-shard-size", type=ByteSizeType(), default="4GB", show_default=True,
              help="Safetensors shard size limit: 4GB, 500MB, 2GiB or bytes.")
@click.option("--no-vllm-check", is_flag=True, help="Skip the greedy check on vLLM's offline engine.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@user_errors_as_one_line
def export_vllm_command(model, out, dtype, max_shard_size, no_vllm_check, overwrite):
    """Write MODEL as a checkpoint that stock vLLM serves, verified by reloading it.

    \b
    The checkpoint is dense safetensors (pruned weights are zeros) plus config, tokenizer, chat
    template, generation config and export_manifest.json. Sparsity metadata that vLLM refuses is
    removed. The export is reloaded through transformers (logits must be identical) and, where vLLM
    is installed, run on vLLM's offline engine (greedy continuation must equal transformers').

    \b
    Examples:
      wanda-serve export vllm runs/wanda-2of4 --out runs/wanda-2of4-vllm
      vllm serve runs/wanda-2of4-vllm
    """
    check_out_apart(out, model)
    manifest = export_vllm(VllmExport(out, model, dtype, max_shard_size, overwrite, vllm_check=not no_vllm_check))
    for item in manifest["stripped_metadata"]:
        click.echo(f"removed {item} from the config (current vLLM refuses it)")
    sparsity = manifest["sparsity"]["exported"]
    click.echo(f"wrote {out}  ({dtype}, {len(manifest['files'])} files, sparsity {sparsity['overall_sparsity']:.4f}, "
               + ", ".join(f"{p} valid: {'yes' if ok else 'no'}" for p, ok in sparsity["all_nm_valid"].items()) + ")")
    checks = manifest["checks"]
    click.echo(f"checks: transformers reload logits identical; vLLM greedy: {checks['vllm']['status']}")


@export.command("gguf")
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output file, FILE.gguf; its manifest goes beside it as FILE.gguf.manifest.json.")
@click.option("--type", "gguf_type", default="f16", show_default=True, metavar="|".join(GGUF_TYPES),
              help="Type of the 2-D weights (1-D tensors and norms stay f32, as llama.cpp's converter keeps them).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE.gguf and its manifest.")
@user_errors_as_one_line
def export_gguf_command(model, out, gguf_type, overwrite):
    """Write MODEL as one GGUF file for llama.cpp, ollama and LM Studio, verified by reading it back.

    \b
    Tensor names, metadata, tokenizer and quantization follow llama.cpp's own converter, through
    the gguf package (q/k rows of LLaMA-style models reordered for llama.cpp's rotary embedding).
    The file is read back with transformers' GGUF loader: every tensor must equal the source's up to
    the type's rounding, the logits on fixed prompts must be within the type's tolerance, the
    tokenizer must tokenize as the source's, and every pruned zero must still be exactly zero;
    otherwise nothing is written. A 32-token greedy continuation is compared and reported, and
    where llama-cpp-python is installed (make llama-cpp), llama.cpp's own greedy continuation too.
    Supported: LLaMA, Mistral (without sliding window) and Qwen2 with byte-level BPE tokenizers.

    \b
    Examples:
      wanda-serve export gguf runs/wanda-2of4 --out runs/wanda-2of4.gguf --type q8_0
      llama-cli -m runs/wanda-2of4.gguf -p "The capital of France is"
    """
    check_out_apart(out, model)
    manifest = export_gguf(GgufExport(out, model, gguf_type, overwrite))
    checks = manifest["checks"]
    click.echo(f"wrote {out}  ({gguf_type}, {manifest['file']['bytes'] / 1e6:.1f} MB, {manifest['architecture']['gguf']} "
               f"architecture, export {manifest['export_seconds']:.1f} s) and {out}.manifest.json")
    zeros = checks["zeros"]
    click.echo(f"read back: max |logit diff| {checks['logits']['max_abs_diff']:.2g} ({checks['logits']['relative_diff']:.2%} of the "
               f"largest, {logits_tolerance_text(checks['logits']['tolerance'])}), greedy equal: {'yes' if checks['greedy']['equal'] else 'no'}, "
               f"tokenizer identical: {'yes' if checks['tokenizer']['identical'] else 'no'}, "
               f"pruned zeros kept: {zeros['zeros_kept']} of {zeros['source_zeros']}")
    llama_cpp = checks["llama_cpp"]
    if llama_cpp["ran"]:
        click.echo(f"llama.cpp (llama-cpp-python {llama_cpp['version']}): greedy tokens agreeing with PyTorch "
                   f"{' and '.join(map(str, llama_cpp['tokens_agreeing']))} of {checks['greedy']['tokens']}")
    else:
        click.echo(f"llama.cpp: not run ({llama_cpp['why']})")


@export.command("onnx")
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8", "int4"]), multiple=True,
              help="Also write a weight-only quantized variant (repeatable): int8 or int4 (onnxruntime MatMulNBits).")
@click.option("--perplexity", "measure_perplexity", is_flag=True, help="Measure the perplexity of the export and each variant.")
@click.option("--eval-data", default="wiki", show_default=True, help="Text for --perplexity (as for eval --data).")
@eval_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@user_errors_as_one_line
def export_onnx_command(model, out, dtype, quantize, measure_perplexity, eval_data, eval_seqlen, eval_windows, overwrite):
    """Write MODEL as an ONNX decoder with a KV cache, verified on onnxruntime.

    \b
    One graph serves prefill (empty past) and decode, with dynamic batch and lengths; weights are
    external data beside it. The export is checked against PyTorch on fixed prompts (logits, and a
    32-token greedy continuation that must be identical) and removed if the check fails.

    \b
    Examples:
      wanda-serve export onnx runs/wanda-2of4 --out runs/wanda-2of4-onnx --quantize int4 --perplexity
      wanda-serve generate-onnx runs/wanda-2of4-onnx "The capital of France is"
    """
    evaluation = EvalOptions(eval_data, eval_seqlen, eval_windows) if measure_perplexity else None
    check_out_apart(out, model)
    manifest = export_onnx(OnnxExport(out, model, dtype, tuple(quantize), evaluation, overwrite))
    click.echo(f"wrote {out}  (export {manifest['export_seconds']:.1f} s, pruned zeros kept: {'yes' if manifest['zeros']['kept'] else 'no'})")
    reference = manifest["pytorch_reference"]
    if "perplexity" in reference:
        click.echo(f"PyTorch {reference['dtype']}: perplexity {reference['perplexity']['perplexity']:.3f}")
    for name, variant in manifest["variants"].items():
        check = variant["check"]
        line = f"{name} ({variant['dtype']}): max |logit diff| vs PyTorch {check['max_abs_logit_diff']:.2g}, greedy equal: {'yes' if check['greedy_equal'] else 'no'}"
        if "perplexity" in variant:
            line += f", perplexity {variant['perplexity']['perplexity']:.3f}"
        click.echo(line)


@export.command("ort-genai")
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--precision", type=click.Choice(["int4", "fp16", "fp32"]), default="int4", show_default=True,
              help="Weights: int4 (MatMulNBits, symmetric), fp16 (CUDA only) or fp32.")
@click.option("--execution-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="The onnxruntime-genai provider the model is built for.")
@click.option("--accuracy-level", type=click.Choice([str(level) for level in ACCURACY_LEVELS]), default=None,
              help="int4: what MatMulNBits computes in: " + ", ".join(f"{level} {name}" for level, name in ACCURACY_LEVELS.items())
                   + " activations (default: the builder's, 4 for the CPU).")
@click.option("--int8-layers", type=click.Choice(list(INT8_LAYERS)), default="none", show_default=True,
              help="int4: MatMuls kept at 8 bits: mixed (the builder's choice of sensitive block layers) or last "
                   "(the lm_head; not when it is tied to the embeddings).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@user_errors_as_one_line
def export_ort_genai_command(model, out, precision, execution_provider, accuracy_level, int8_layers, overwrite):
    """Write MODEL with onnxruntime-genai's model builder, verified on onnxruntime-genai.

    \b
    MODEL: as for prune (a directory from `wanda-serve prune`); omitted, the embedded SmolLM2.
    OUT is what onnxruntime_genai.Model loads (genai_config.json, model.onnx, tokenizer). The
    32-token greedy continuation of fixed prompts on onnxruntime-genai must equal PyTorch's in
    float32 for fp32 (otherwise nothing is written); for fp16 and int4 the agreement is reported.
    Every pruned zero is checked in the graph's weights (int4: dequantized).

    \b
    Examples:
      wanda-serve export ort-genai runs/wanda-2of4 --out runs/wanda-2of4-genai
      wanda-serve export ort-genai runs/wanda-2of4 --out runs/wanda-2of4-genai-fp32 --precision fp32
    """
    level = None if accuracy_level is None else int(accuracy_level)
    check_out_apart(out, model)
    manifest = export_ort_genai(OrtGenaiExport(out, model, precision, execution_provider, accuracy_level=level,
                                               int8_layers=int8_layers, overwrite=overwrite))
    builder, zeros, checks = manifest["builder"], manifest["zeros"], manifest["checks"]
    click.echo(f"wrote {out}  ({precision} for {execution_provider}, onnxruntime-genai {builder['version']} model builder, "
               f"{manifest['export_seconds']:.1f} s)")
    if zeros["kept"]:
        click.echo(f"pruned zeros kept: all {zeros['source_zeros']} ({zeros['weights']})")
    else:
        click.echo(f"pruned zeros: {zeros['pruned_not_zero']} of {zeros['source_zeros']} are no longer zero ({zeros['weights']})")
    greedy = checks["greedy"]
    agreement = ", ".join("equal" if p["equal"] else f"differs from token {p['first_divergence']}" for p in greedy["prompts"])
    click.echo(f"greedy vs PyTorch float32 on onnxruntime-genai ({checks['provider']}): {agreement}; "
               f"max log-prob gap {greedy['max_log_prob_gap']:.2g}")
    if "note" in checks:
        click.echo(f"note: {checks['note']}")
