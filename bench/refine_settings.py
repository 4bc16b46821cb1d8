"""Choose block-output refinement's learning rate and samples per step on calibration text only, never the evaluation text.

For a few decoder blocks of a model (default: the embedded SmolLM2; dense inputs): prune the block with
`--method` at 2:4 (default: the default recipe's wanda), fit it with `Refine` at each learning rate and
batch (samples per step), and measure the block's output error ‖pruned − dense‖² / ‖dense‖² on held-out
calibration windows (another seed, so other windows of the calibration region). Writes a Markdown table
and its JSON.

    python bench/refine_settings.py --out docs/refine_settings.md
    python bench/refine_settings.py --model qwen2.5-coder-1.5b --method sparsegpt --blocks 0,14,27 --batches 8 \
        --lrs 0.0025,0.005,0.01,0.02 --out docs/refine_settings_qwen2.5-coder-1.5b.md
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from wanda_serve.data import calibration_batches, load_corpus
from wanda_serve.engine import (Refine, block_statistics, capture_block_inputs, find_decoder_blocks, find_linears, output_error,
                                run_block)
from wanda_serve.methods import get_method
from wanda_serve.models import load_model
from wanda_serve.structure import Structure

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import write_json  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--blocks", default="0,10,20,29")
    parser.add_argument("--lrs", default="0.005,0.01,0.02,0.05", help="relative: times each layer's mean |w| (see Refine)")
    parser.add_argument("--batches", default="8,64", help="samples per Adam step, of the 64 calibration windows")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    started = time.time()
    loaded = load_model(args.model)
    corpus = load_corpus("wiki")
    fit_block_calls, fit_hidden = capture_block_inputs(loaded.model, calibration_batches(corpus, loaded.tokenizer, 64, 512, 0, 8), CPU)
    held_block_calls, held_hidden = capture_block_inputs(loaded.model, calibration_batches(corpus, loaded.tokenizer, 16, 512, 1, 8), CPU)
    blocks, method, structure = find_decoder_blocks(loaded.model), get_method(args.method), Structure(n=2, m=4)
    chosen = [int(b) for b in args.blocks.split(",")]
    settings = [(float(lr), int(batch)) for batch in args.batches.split(",") for lr in args.lrs.split(",")]
    rows = []
    with torch.no_grad():
        for index, block in enumerate(blocks):
            fit_calls, held_calls = fit_block_calls[index], held_block_calls[index]
            if index in chosen:
                pruned = copy.deepcopy(block)
                linears = find_linears(pruned)
                stats, fit_targets = block_statistics(pruned, linears, method.statistic, fit_calls, fit_hidden, CPU)
                held_targets = run_block(block, held_calls, held_hidden)
                for name, linear in linears.items():
                    linear.weight.data = method.prune(linear.weight.data, stats[name], structure)
                row = {"block": index, "0": output_error(run_block(pruned, held_calls, held_hidden), held_targets)}
                for lr, batch in settings:
                    refined = copy.deepcopy(pruned)
                    Refine(args.steps, lr=lr, batch=batch)(refined, find_linears(refined), fit_calls, fit_hidden, fit_targets)
                    row[f"{lr:g}, {batch}"] = output_error(run_block(refined, held_calls, held_hidden), held_targets)
                print(row, flush=True)
                rows.append(row)
            fit_hidden = run_block(block, fit_calls, fit_hidden)
            held_hidden = run_block(block, held_calls, held_hidden)
            if index >= max(chosen):
                break
    command = shlex.join(["python", "bench/refine_settings.py", *sys.argv[1:]])
    header = ["block", "not refined", *(f"lr {lr:g}, batch {batch}" for lr, batch in settings)]
    lines = ["# Block-output refinement: learning rate and samples per step", "",
             f"Written by `{command}` in {(time.time() - started) / 60:.0f} minutes.", "",
             f"{loaded.source}, {args.method} 2:4 per block on the dense model's block inputs; {args.steps} Adam steps, each on "
             "`batch` of the 64 calibration windows (512 tokens, seed 0), each layer's learning rate lr × the mean |w| of its "
             "surviving weights. Output error ‖pruned − dense‖² / ‖dense‖² on 16 held-out calibration windows (seed 1), with its "
             "change against not refining; the lowest of each block in bold where it beats not refining. The evaluation text "
             "is not used; the numbers are in the JSON beside this page.", "",
             "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        unrefined, *refined = [v for k, v in row.items() if k != "block"]
        cells = [f"{v:.3g} ({v / unrefined - 1:+.0%})" for v in refined]
        lowest = min(range(len(refined)), key=refined.__getitem__)
        cells[lowest] = f"**{cells[lowest]}**" if refined[lowest] < unrefined else cells[lowest]
        lines.append("| " + " | ".join([str(row["block"]), f"{unrefined:.3g}", *cells]) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    write_json(args.out.with_suffix(".json"), {"command": command, "rows": rows})


if __name__ == "__main__":
    main()
