"""GPU check of the 2:4 runtime: dense vs semi-structured GEMMs, then a 7B-sized Llama end to end.

Per linear shape of LLaMA-2-7B, Llama-3-8B and SmolLM2-135M, at 1 to 8192 tokens, on both PyTorch
backends (CUTLASS, cuSPARSELt): median time of the dense and the sparse GEMM of the same 2:4 weight
(CUDA events), and their max abs difference. Then a transformers Llama at 7B dimensions (random
weights pruned 2:4, bf16): prefill and decode, dense vs its linear layers swapped to
deploy.sparse24.Sparse24Linear, decided per layer by the vLLM plugin's own plan_layer with the
thresholds just measured. PyTorch only, one process.

    python bench/gpu_sparse.py --out docs/gpu_sparse.md             # a CUDA GPU, SM80+ (minutes on an H100)
    python bench/gpu_sparse.py --dry-run --out /tmp/gpu_sparse.md   # anywhere: tiny shapes on the CPU

The dry run times both paths with dense kernels (there are no 2:4 kernels on a CPU) and checks the
arithmetic: medians, speedups, thresholds, differences (which must be exactly 0 there), the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deploy.sparse24 import (
    BACKENDS, Sparse24Linear, compress, measure_timings, median_ms, plan_layer, runtime_unavailable_reason, threshold_from_timings,
    unsupported_reason,
)
from wanda_serve.engine import find_decoder_blocks, find_linears
from wanda_serve.structure import Structure, prune_mask

SHAPES = {  # model -> layer -> (out, in)
    "LLaMA-2-7B": {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "Llama-3-8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "SmolLM2-135M": {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)},
}
TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DRY_SHAPES = {"tiny": {"a": (64, 128), "b": (128, 64)}}
DRY_TOKENS = (1, 8, 64)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
DRY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=320)


def prune_2_of_4(weight: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(prune_mask(weight.abs().float(), Structure(n=2, m=4)), 0)


@torch.no_grad()
def gemm_rows(shapes: dict, tokens_list, dtype, device, repeats: int, dry: bool) -> list[dict]:
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for model, layers in shapes.items():
        for layer, (out_features, in_features) in layers.items():
            weight = prune_2_of_4(torch.randn(out_features, in_features, device=device, generator=generator)).to(dtype)
            for backend in BACKENDS:
                row = {"model": model, "layer": layer, "shape": [out_features, in_features], "backend": backend}
                reason = unsupported_reason(weight, backend)
                if reason is not None:
                    rows.append(row | {"unsupported": reason})
                    continue
                sparse = weight.clone() if dry else compress(weight, backend)
                # the plugin's own load-time timing, here at every token count and repeat count asked for
                timings = measure_timings(weight, sparse, tokens_list, repeats)
                for tokens, (dense_ms, sparse_ms) in timings.items():
                    x = torch.randn(tokens, in_features, device=device, dtype=dtype, generator=generator)
                    dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
                    rows.append(row | {"tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                                       "speedup": dense_ms / sparse_ms,
                                       "max_abs_diff": float((sparse_out.float() - dense_out.float()).abs().max())})
    return rows


def thresholds(rows: list[dict]) -> dict[str, int | None]:
    """Per 'out x in backend': the token count from which sparse wins (deploy.sparse24's rule)."""
    timings: dict[str, dict[int, tuple[float, float]]] = {}
    for row in rows:
        if "tokens" in row:
            key = f"{row['shape'][0]}x{row['shape'][1]} {row['backend']}"
            timings.setdefault(key, {})[row["tokens"]] = (row["dense_ms"], row["sparse_ms"])
    return {key: threshold_from_timings(by_tokens) for key, by_tokens in timings.items()}


def swap_to_sparse(model, measured: dict[str, int | None]) -> dict:
    """Decide every linear of the decoder blocks as the vLLM plugin does (plan_layer), with the thresholds just
    measured instead of its load-time timing; swap the ones it takes over. What stayed dense and why."""
    kept_dense, extra_bytes = {}, 0
    for index, block in enumerate(find_decoder_blocks(model)):
        for name, linear in find_linears(block).items():
            weight24, record = plan_layer(linear.weight.detach(),
                                          lambda rows, cols, dtype, backend, device: measured.get(f"{rows}x{cols} {backend}"))
            if weight24 is None:
                kept_dense[f"{index}.{name}"] = record["reason"]
                continue
            extra_bytes += record["extra_bytes"]
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], Sparse24Linear(weight24, linear.bias))
    return {"kept_dense": kept_dense, "extra_gib": extra_bytes / 2**30}


@torch.no_grad()
def end_to_end(config_kwargs: dict, measured: dict, dtype, device, repeats: int, dry: bool, prefill_tokens: int,
               decode_steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**config_kwargs), torch_dtype=dtype).eval()
    for block in find_decoder_blocks(model):
        for linear in find_linears(block).values():
            linear.weight.data = prune_2_of_4(linear.weight.data)
    ids = torch.randint(0, config_kwargs["vocab_size"], (1, prefill_tokens), device=device)

    def prefill():
        return model(input_ids=ids, use_cache=True)

    def decode():
        out = model(input_ids=ids[:, :16], use_cache=True)
        for _ in range(decode_steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)

    result = {"prefill_tokens": prefill_tokens, "decode_steps": decode_steps}
    reference = prefill().logits.float()
    result["dense"] = {"prefill_ms": median_ms(prefill, repeats, device), "decode_ms": median_ms(decode, max(1, repeats // 4), device)}
    result["swap"] = {"kept_dense": {}, "extra_gib": 0.0, "note": "dry run: nothing swapped"} if dry else swap_to_sparse(model, measured)
    result["max_abs_logit_diff"] = float((prefill().logits.float() - reference).abs().max())
    result["sparse"] = {"prefill_ms": median_ms(prefill, repeats, device), "decode_ms": median_ms(decode, max(1, repeats // 4), device)}
    result["prefill_speedup"] = result["dense"]["prefill_ms"] / result["sparse"]["prefill_ms"]
    result["decode_speedup"] = result["dense"]["decode_ms"] / result["sparse"]["decode_ms"]
    return result


def check_dry_arithmetic(rows: list[dict], measured: dict, e2e: dict) -> None:
    """In a dry run both paths are the same dense GEMM: results must be exact, and the derived numbers consistent."""
    for row in rows:
        if "tokens" in row:
            assert row["max_abs_diff"] == 0.0, row
            assert abs(row["speedup"] - row["dense_ms"] / row["sparse_ms"]) < 1e-12, row
    for key, threshold in measured.items():
        timings = {r["tokens"]: (r["dense_ms"], r["sparse_ms"]) for r in rows
                   if "tokens" in r and f"{r['shape'][0]}x{r['shape'][1]} {r['backend']}" == key}
        assert threshold is None or all(s < d for t, (d, s) in timings.items() if t >= threshold), key
    assert e2e["max_abs_logit_diff"] == 0.0


def render(result: dict) -> str:
    lines = [
        "# 2:4 semi-structured GEMMs vs dense" + (" (dry run: CPU, both paths dense)" if result["dry_run"] else ""),
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; torch {result['torch']}; dtype {result['dtype']}; median of {result['repeats']} runs.",
        "",
        "| model | layer | out x in | backend | tokens | dense ms | sparse ms | speedup | max abs diff |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["gemm"]:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        if "unsupported" in row:
            lines.append(f"| {row['model']} | {row['layer']} | {shape} | {row['backend']} | | | | unsupported: {row['unsupported']} | |")
        else:
            lines.append(f"| {row['model']} | {row['layer']} | {shape} | {row['backend']} | {row['tokens']} | {row['dense_ms']:.4f} | "
                         f"{row['sparse_ms']:.4f} | {row['speedup']:.2f} | {row['max_abs_diff']:.3g} |")
    lines += ["", "## Thresholds (tokens from which sparse wins)", "", "| shape backend | threshold |", "|---|---:|"]
    lines += [f"| {key} | {'never' if value is None else value} |" for key, value in result["thresholds"].items()]
    e2e = result["end_to_end"]
    lines += [
        "", "## End to end: Llama at 7B dimensions, random weights pruned 2:4" if not result["dry_run"] else "", "",
        f"Prefill of {e2e['prefill_tokens']} tokens: dense {e2e['dense']['prefill_ms']:.1f} ms, sparse {e2e['sparse']['prefill_ms']:.1f} ms "
        f"(x{e2e['prefill_speedup']:.2f}). Decode of {e2e['decode_steps']} tokens after a 16-token prompt, batch 1: dense "
        f"{e2e['dense']['decode_ms']:.1f} ms, sparse {e2e['sparse']['decode_ms']:.1f} ms (x{e2e['decode_speedup']:.2f}). "
        f"Max abs logit difference {e2e['max_abs_logit_diff']:.3g}. Extra memory of the compressed copies: "
        f"{e2e['swap']['extra_gib']:.2f} GiB; layers kept dense: {len(e2e['swap']['kept_dense'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Markdown table; the JSON goes beside it.")
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU, both paths dense: checks the arithmetic.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        device, shapes, tokens, llama, prefill, steps = torch.device("cpu"), DRY_SHAPES, DRY_TOKENS, DRY_LLAMA, 32, 4
        dtype = torch.float32 if dtype == torch.float16 else dtype
    else:
        reason = runtime_unavailable_reason()
        if reason is not None:
            sys.exit(f"error: the 2:4 kernels cannot run here: {reason}; use --dry-run to check the script on a CPU")
        device, shapes, tokens, llama, prefill, steps = torch.device("cuda"), SHAPES, TOKENS, LLAMA_7B, 2048, 64

    started = time.perf_counter()
    rows = gemm_rows(shapes, tokens, dtype, device, args.repeats, args.dry_run)
    measured = thresholds(rows)
    e2e = end_to_end(llama, measured, dtype, device, max(3, args.repeats // 4), args.dry_run, prefill, steps)
    if args.dry_run:
        check_dry_arithmetic(rows, measured, e2e)
    result = {
        "command": "python bench/gpu_sparse.py " + " ".join(sys.argv[1:]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "seconds": time.perf_counter() - started,
        "gemm": rows, "thresholds": measured, "end_to_end": e2e,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(render(result))
    print(args.out.read_text())
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
