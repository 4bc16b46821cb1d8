"""GPU check of the 2:4 runtime: dense vs semi-structured GEMMs per backend and dtype, then a 7B-sized Llama through
the runtime's own per-layer code, eagerly, under torch.compile and replayed from CUDA graphs.

GEMMs: per linear shape of LLaMA-2-7B, Llama-3-8B and SmolLM2-135M, in bfloat16, float16 and float32, at 1 to
8192 tokens, on both PyTorch backends (cuSPARSELt, CUTLASS), each tried whether or not the vLLM plugin would use
it: median time of the dense GEMM and of the runtime's sparse path (CUDA events), called eagerly (as the plugin
times it, host work included) and replayed from a CUDA graph (the kernels alone, as vLLM's captured batch sizes
run), the relative error against the probe's tolerance, and why the plugin would not use that backend there, if
it would not. A backend that raises is a row with its error, and the run goes on.

End to end: a transformers Llama at 7B dimensions (random weights pruned 2:4, --dtype). Every linear of its blocks
is decided by the plugin's own plan_layer (probe included, replayed from a CUDA graph) at a fixed token threshold
between decode and prefill, so that both paths run whatever the timings say, and swapped to
deploy.sparse24.Sparse24Linear; prefill and decode are timed dense and swapped. Then the dense and the swapped model
run eagerly, under torch.compile (dynamic shapes), captured in a CUDA graph, and compiled and captured (what vLLM
does), at 1 token (the dense path) and at the prefill length (the sparse path); each is compared with the dense
model's eager logits, so that the swapped model's error reads against what the same mode does to the dense model
(a 32-layer random model amplifies any change of rounding). Each failure is a row with its error. PyTorch only,
one process.

    python bench/gpu_sparse.py --out docs/gpu_sparse.md             # a CUDA GPU (about 3 minutes on an H200)
    python bench/gpu_sparse.py --dry-run --out /tmp/gpu_sparse.md   # anywhere: tiny shapes on the CPU

The dry run is the same code on the CPU with tiny shapes and the "standin" backend (the CUTLASS layout: kept
values and their 2-bit positions, packed by PyTorch and unpacked on every call) and torch.compile's aot_eager
backend (inductor would need minutes of C++ builds): the packing, the swap, the dispatch and the comparisons run
for real. It fails unless every comparison the plugin would rely on is within tolerance, every layer was swapped,
and the derived numbers agree. CUDA graphs are skipped there. On a GPU machine, bench/gpu_checks.sh runs this with
the CUDA tests.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deploy.sparse24 import (
    GPU_BACKENDS, PROBE_TOLERANCE_EPS, Execution, Sparse24Linear, Sparse24Weight, backend_reason, measure_timings,
    median_ms, plan_layer, relative_error, run_in_cuda_graph, runtime_unavailable_reason, threshold_from_timings, tolerance,
)
from wanda_serve.engine import find_decoder_blocks, find_linears
from wanda_serve.structure import Structure, prune_mask

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import write_json  # noqa: E402

SHAPES = {  # model -> layer -> (out, in)
    "LLaMA-2-7B": {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "Llama-3-8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "SmolLM2-135M": {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)},
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


@dataclass(frozen=True)
class Setup:
    device: torch.device
    shapes: dict
    tokens: tuple[int, ...]
    llama: dict
    prefill_tokens: int
    decode_steps: int
    backends: tuple[str, ...]
    compile_backend: str
    swap_threshold: int  # tokens from which every swapped layer takes the sparse path: between decode and prefill


# A fixed threshold between decode (1 token) and prefill makes both paths run and be checked, whatever the timings
# say; the thresholds table says where the plugin would take each shape over.
GPU = Setup(torch.device("cuda"), SHAPES, (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192), LLAMA_7B, 2048, 64,
            GPU_BACKENDS, "inductor", 16)
DRY = Setup(torch.device("cpu"), {"tiny": {"a": (64, 128), "b": (128, 64)}}, (1, 8, 64),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=320), 32, 4, ("standin",), "aot_eager", 8)


def prune_2_of_4(weight: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(prune_mask(weight.abs().float(), Structure(n=2, m=4)), 0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


@torch.no_grad()
def gemm_rows(setup: Setup, dtypes, repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator(device=setup.device).manual_seed(0)
    for dtype in dtypes:
        for model, layers in setup.shapes.items():
            for layer, (out_features, in_features) in layers.items():
                weight = prune_2_of_4(torch.randn(out_features, in_features, device=setup.device, generator=generator)).to(dtype)
                for backend in setup.backends:
                    row = {"dtype": dtype_name(dtype), "model": model, "layer": layer, "shape": [out_features, in_features],
                           "backend": backend, "plugin_skips": backend_reason(weight, backend)}
                    try:
                        weight24 = Sparse24Weight.pack(weight, backend)
                        # the plugin's own load-time timing, here at every token count and repeat count asked for
                        timings = measure_timings(weight, weight24.linear, setup.tokens, repeats)
                        replayed = (measure_timings(weight, weight24.linear, setup.tokens, repeats, graphs=True)
                                    if setup.device.type == "cuda" else {})
                        for tokens, (dense_ms, sparse_ms) in timings.items():
                            x = torch.randn(tokens, in_features, device=setup.device, dtype=dtype, generator=generator)
                            error = relative_error(weight24.linear(x), F.linear(x, weight))
                            graph_dense_ms, graph_sparse_ms = replayed.get(tokens, (None, None))
                            rows.append(row | {"tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                                               "speedup": dense_ms / sparse_ms, "graph_dense_ms": graph_dense_ms,
                                               "graph_sparse_ms": graph_sparse_ms,
                                               "graph_speedup": graph_dense_ms / graph_sparse_ms if graph_sparse_ms else None,
                                               "relative_error": error, "within_tolerance": error <= tolerance(dtype)})
                    except Exception as e:  # noqa: BLE001 - a failing backend is a result: record it and go on
                        rows.append(row | {"error": error_text(e)})
    return rows


def shape_key(rows: int, cols: int, dtype: str, backend: str) -> str:
    return f"{rows}x{cols} {dtype} {backend}"


def thresholds(rows: list[dict], prefix: str = "") -> dict[str, int | None]:
    """Per shape, dtype and backend the plugin would try: the token count from which sparse wins (deploy.sparse24's
    rule), from the eager timings (prefix "", what the plugin measures) or the CUDA graph replays (prefix "graph_")."""
    timings: dict[str, dict[int, tuple[float, float]]] = {}
    for row in rows:
        if "tokens" in row and row["plugin_skips"] is None and row[f"{prefix}sparse_ms"] is not None:
            key = shape_key(*row["shape"], row["dtype"], row["backend"])
            timings.setdefault(key, {})[row["tokens"]] = (row[f"{prefix}dense_ms"], row[f"{prefix}sparse_ms"])
    return {key: threshold_from_timings(by_tokens) for key, by_tokens in timings.items()}


def swap_to_sparse(model, threshold_for_shape, backends: tuple[str, ...], execution: Execution) -> dict:
    """Decide every linear of the decoder blocks as the vLLM plugin does (plan_layer, probe included), with the given
    threshold instead of its load-time timing; swap the ones it takes over. What stayed dense and why."""
    kept_dense, swapped, extra_bytes = {}, 0, 0
    for index, block in enumerate(find_decoder_blocks(model)):
        for name, linear in find_linears(block).items():
            weight24, record = plan_layer(linear.weight.detach(), threshold_for_shape, backends, execution)
            if weight24 is None:
                kept_dense[f"{index}.{name}"] = record["reason"]
                continue
            swapped, extra_bytes = swapped + 1, extra_bytes + record["extra_bytes"]
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], Sparse24Linear(weight24, linear.bias))
    return {"swapped": swapped, "kept_dense": kept_dense, "extra_gib": extra_bytes / 2**30}


def logits(forward, ids: torch.Tensor) -> torch.Tensor:
    return forward(input_ids=ids, use_cache=False).logits


def attempt(run) -> torch.Tensor | str:
    """run()'s logits, or the error it raised as text: a mode that fails is a result."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        return error_text(e)


def mode_logits(model, ids: torch.Tensor, sizes: tuple[int, ...], setup: Setup) -> dict[tuple[str, int], torch.Tensor | str]:
    """(mode, tokens) -> the model's logits, or why they could not be computed: eagerly, under torch.compile with
    dynamic shapes, and each replayed from a CUDA graph (vLLM compiles, then captures per batch size)."""
    torch._dynamo.reset()  # the swapped model is compiled afresh, not from the dense model's cache
    forwards = {"eager": model, "torch.compile": torch.compile(model, dynamic=True, backend=setup.compile_backend)}
    results = {}
    for mode, forward in forwards.items():
        for tokens in sizes:
            run = functools.partial(logits, forward, ids[:, :tokens])
            results[(mode, tokens)] = attempt(run)
            graph_mode = f"{mode} + CUDA graph" if mode != "eager" else "CUDA graph"
            results[(graph_mode, tokens)] = (attempt(lambda: run_in_cuda_graph(run)) if setup.device.type == "cuda"
                                             else "skipped: no CUDA device")
    return results


def compare_logits(result: torch.Tensor | str, reference: torch.Tensor) -> dict:
    if isinstance(result, str):
        return {"skipped": result.removeprefix("skipped: ")} if result.startswith("skipped: ") else {"error": result}
    return {"relative_error": relative_error(result, reference),
            "max_abs_diff": float((result.float() - reference.float()).abs().max())}


@torch.no_grad()
def end_to_end(setup: Setup, dtype: torch.dtype, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = setup.device
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**setup.llama), dtype=dtype).eval()
    for block in find_decoder_blocks(model):
        for linear in find_linears(block).values():
            linear.weight.data = prune_2_of_4(linear.weight.data)
    ids = torch.randint(0, setup.llama["vocab_size"], (1, setup.prefill_tokens), device=device)
    sizes = (1, setup.prefill_tokens)  # below every threshold above 1 (the dense path), and the sparse one

    def prefill():
        return model(input_ids=ids, use_cache=True)

    def decode():
        out = model(input_ids=ids[:, :16], use_cache=True)
        for _ in range(setup.decode_steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)

    result = {"prefill_tokens": setup.prefill_tokens, "decode_steps": setup.decode_steps, "swap_threshold": setup.swap_threshold}
    dense_modes = mode_logits(model, ids, sizes, setup)
    reference = {tokens: dense_modes[("eager", tokens)] for tokens in sizes}
    result["dense"] = {"prefill_ms": median_ms(prefill, repeats, device), "decode_ms": median_ms(decode, max(1, repeats // 4), device)}

    def threshold_for_shape(rows, cols, weight_dtype, backend, weight_device, graphs):
        return setup.swap_threshold

    # what vLLM does by default, so the probe also replays each layer from a CUDA graph where there is one
    execution = Execution(compiled=True, cuda_graphs=device.type == "cuda")
    result["swap"] = swap_to_sparse(model, threshold_for_shape, setup.backends, execution)
    result["sparse"] = {"prefill_ms": median_ms(prefill, repeats, device), "decode_ms": median_ms(decode, max(1, repeats // 4), device)}
    result["prefill_speedup"] = result["dense"]["prefill_ms"] / result["sparse"]["prefill_ms"]
    result["decode_speedup"] = result["dense"]["decode_ms"] / result["sparse"]["decode_ms"]

    result["modes"] = [
        {"mode": mode, "tokens": tokens, "dense": compare_logits(dense_modes[(mode, tokens)], reference[tokens])}
        | compare_logits(swapped, reference[tokens])
        for (mode, tokens), swapped in mode_logits(model, ids, sizes, setup).items()]
    return result


def dry_run_failures(result: dict) -> list[str]:
    """On the stand-in the sparse path must give the dense outputs and everything must be swapped; the derived
    numbers must agree with the measured ones. An empty list: the dry run passed."""
    failures = []
    checked = [row for row in result["gemm"] if row["plugin_skips"] is None]
    if not checked:
        failures.append("no GEMM row the plugin would use")
    for row in checked:
        if "error" in row or not row["within_tolerance"]:
            failures.append(f"GEMM row differs from dense or failed: {row}")
        elif abs(row["speedup"] - row["dense_ms"] / row["sparse_ms"]) > 1e-12:
            failures.append(f"speedup is not dense / sparse: {row}")
    for key, threshold in result["thresholds"].items():
        timings = {r["tokens"]: (r["dense_ms"], r["sparse_ms"]) for r in checked
                   if "tokens" in r and shape_key(*r["shape"], r["dtype"], r["backend"]) == key}
        if threshold is not None and not all(s < d for t, (d, s) in timings.items() if t >= threshold):
            failures.append(f"threshold {threshold} of {key} is not where sparse wins for good: {timings}")
    e2e = result["end_to_end"]
    if e2e["swap"]["kept_dense"] or not e2e["swap"]["swapped"]:
        failures.append(f"layers kept dense: {e2e['swap']['kept_dense']}")
    limit = tolerance(getattr(torch, result["dtype"]))
    for row in e2e["modes"]:
        if "skipped" not in row and ("error" in row or not row["relative_error"] <= limit):
            failures.append(f"logits differ from the dense model's beyond {limit:.3g} or failed: {row}")
    return failures


def render(result: dict) -> str:
    lines = [
        "# 2:4 semi-structured GEMMs vs dense" + (" (dry run: CPU, the stand-in backend)" if result["dry_run"] else ""),
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; torch {result['torch']}; median of {result['repeats']} runs; probe tolerance "
        f"{result['tolerance_eps']} epsilons of the dtype (relative error: max |sparse - dense| / (|dense| + mean |dense|)).",
        "",
        "## GEMMs, every backend tried (`plugin skips`: why the vLLM plugin would not use it; empty: it probes and times it)",
        "",
        "Called eagerly (host work included, as the plugin times it) and replayed from a CUDA graph (the kernels alone).",
        "",
        "| dtype | model | layer | out x in | backend | plugin skips | tokens | dense ms | sparse ms | speedup | graph: dense ms "
        "| graph: sparse ms | graph: speedup | relative error | within tolerance |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["gemm"]:
        head = (f"| {row['dtype']} | {row['model']} | {row['layer']} | {row['shape'][0]}x{row['shape'][1]} | {row['backend']} | "
                f"{row['plugin_skips'] or ''} |")
        if "error" in row:
            lines.append(f"{head} | | | | | | | error: {row['error'].replace('|', '/')} | |")
        else:
            graph = (f"{row['graph_dense_ms']:.4f} | {row['graph_sparse_ms']:.4f} | {row['graph_speedup']:.2f}"
                     if row["graph_sparse_ms"] is not None else "- | - | -")
            lines.append(f"{head} {row['tokens']} | {row['dense_ms']:.4f} | {row['sparse_ms']:.4f} | {row['speedup']:.2f} | {graph} | "
                         f"{row['relative_error']:.3g} | {'yes' if row['within_tolerance'] else 'NO'} |")
    lines += ["", "## Thresholds (tokens from which sparse wins), where the plugin would try the backend", "",
              "Both as the plugin measures them at load: eager for calls run eagerly, CUDA graph (replays: the kernels alone) "
              "for calls captured in a graph, where the server captures graphs.", "",
              "| shape dtype backend | eager | CUDA graph |", "|---|---:|---:|"]
    lines += [f"| {key} | {threshold_text(value)} | {threshold_text(result['graph_thresholds'].get(key, 'not timed'))} |"
              for key, value in result["thresholds"].items()]
    e2e = result["end_to_end"]
    swap = e2e["swap"]
    reasons: dict[str, int] = {}
    for reason in swap["kept_dense"].values():
        reasons[reason] = reasons.get(reason, 0) + 1
    lines += [
        "", f"## End to end: Llama at {'7B' if not result['dry_run'] else 'tiny'} dimensions, random weights pruned 2:4, "
        f"{result['dtype']}", "",
        f"Swapped {swap['swapped']} linear layers to the 2:4 path from {e2e['swap_threshold']} tokens up, a fixed threshold so that "
        f"both paths run ({swap['extra_gib']:.2f} GiB extra memory); kept dense: "
        f"{len(swap['kept_dense'])}" + "".join(f"; {count} × {reason}" for reason, count in reasons.items()) + ".",
        "",
        f"Prefill of {e2e['prefill_tokens']} tokens: dense {e2e['dense']['prefill_ms']:.1f} ms, sparse {e2e['sparse']['prefill_ms']:.1f} ms "
        f"(x{e2e['prefill_speedup']:.2f}). Decode of {e2e['decode_steps']} tokens after a 16-token prompt, batch 1: dense "
        f"{e2e['dense']['decode_ms']:.1f} ms, sparse {e2e['sparse']['decode_ms']:.1f} ms (x{e2e['decode_speedup']:.2f}).",
        "",
        "Logits per execution mode against the dense model's eager logits: the dense model in that mode (what a change of "
        "kernels or fusion alone does) and the swapped model.",
        "",
        "| mode | tokens | dense: relative error | swapped: relative error | swapped: max abs diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in e2e["modes"]:
        diff = f"{row['max_abs_diff']:.3g}" if "max_abs_diff" in row else ""
        lines.append(f"| {row['mode']} | {row['tokens']} | {comparison_text(row['dense'])} | {comparison_text(row)} | {diff} |")
    return "\n".join(lines) + "\n"


def threshold_text(value: int | str | None) -> str:
    return "never" if value is None else str(value)


def comparison_text(comparison: dict) -> str:
    if "relative_error" in comparison:
        return f"{comparison['relative_error']:.3g}"
    return "error: " + comparison["error"].replace("|", "/") if "error" in comparison else "skipped: " + comparison["skipped"]


def measure(setup: Setup, dtype: torch.dtype, repeats: int) -> dict:
    rows = gemm_rows(setup, DTYPES, repeats)
    return {"dtype": dtype_name(dtype), "gemm": rows, "thresholds": thresholds(rows), "graph_thresholds": thresholds(rows, "graph_"),
            "end_to_end": end_to_end(setup, dtype, max(3, repeats // 4))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Markdown report; the JSON goes beside it.")
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU with the stand-in backend; fails on any wrong result.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="Of the end-to-end model.")
    args = parser.parse_args()

    if not args.dry_run:
        reason = runtime_unavailable_reason()
        if reason is not None:
            sys.exit(f"error: the 2:4 kernels cannot run here: {reason}; use --dry-run to check the script on a CPU")
    setup = DRY if args.dry_run else GPU
    started = time.perf_counter()
    result = {
        "command": "python bench/gpu_sparse.py " + " ".join(sys.argv[1:]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "repeats": args.repeats, "tolerance_eps": PROBE_TOLERANCE_EPS,
    } | measure(setup, getattr(torch, args.dtype), args.repeats)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    args.out.write_text(render(result))
    print(args.out.read_text())
    print(f"{result['seconds']:.0f} s")
    if args.dry_run:
        failures = dry_run_failures(result)
        if failures:
            sys.exit("dry run failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
