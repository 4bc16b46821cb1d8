"""ONNX benchmark: dense vs pruned, side by side in one run.

For each model: export to ONNX (fp32, plus int8 and int4 weight-only variants) through the CLI,
then, in this process, onnxruntime prefill latency (1 x 128 tokens) and decode tokens/s against
PyTorch on the same machine, alternating dense and pruned so drift favours neither. Perplexity of
every variant comes from the export's own manifest.

    python bench/onnx_export.py --out docs/onnx_benchmark.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import cpu_name, write_json  # noqa: E402

from exporters.onnx_runtime import OnnxCausalLM  # noqa: E402
from wanda_serve.models import resolve_model  # noqa: E402

VARIANTS = ("model.onnx", "model.int8.onnx", "model.int4.onnx")


def wanda_serve(*args: str) -> None:
    print("$", shlex.join(["wanda-serve", *args]), flush=True)
    subprocess.run([sys.executable, "-m", "wanda_serve", *args], check=True)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def torch_runners(model, prompt: torch.Tensor, new_tokens: int):
    def prefill():
        model(input_ids=prompt, use_cache=False)

    def decode():
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)

    return prefill, decode


def onnx_runners(runner: OnnxCausalLM, prompt: np.ndarray, new_tokens: int):
    return (lambda: runner.logits(prompt)), (lambda: runner.generate(prompt[0].tolist(), new_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--pruned", type=Path, default=None, help="default: prune the dense model with Wanda 2:4 first")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-onnx"))
    parser.add_argument("--out", type=Path, default=Path("docs/onnx_benchmark.md"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    dense_spec = [args.dense] if args.dense else []
    pruned = args.pruned
    if pruned is None:
        pruned = args.work / "wanda-2of4"
        wanda_serve("prune", *dense_spec, "--out", str(pruned), "--no-eval", "--overwrite")
    models = {"dense": dense_spec, "wanda 2:4": [str(pruned)]}
    manifests = {}
    for name, spec in models.items():
        out = args.work / f"{name.replace(' ', '-').replace(':', 'of')}-onnx"
        wanda_serve("export", "onnx", *spec, "--out", str(out), "--quantize", "int8", "--quantize", "int4",
                    "--perplexity", "--eval-windows", str(args.eval_windows), "--overwrite")
        manifests[name] = (out, json.loads((out / "export_manifest.json").read_text()))

    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    torch_dirs = {"dense": resolve_model(args.dense), "wanda 2:4": str(pruned)}
    runners = {}
    for name, (out, _) in manifests.items():
        torch_model = AutoModelForCausalLM.from_pretrained(torch_dirs[name]).eval()
        runners[(name, "PyTorch fp32")] = torch_runners(torch_model, prompt, args.new_tokens)
        for variant in VARIANTS:
            runners[(name, variant)] = onnx_runners(OnnxCausalLM(out / variant, provider="cpu"), prompt.numpy(), args.new_tokens)
    for prefill, decode in runners.values():  # warm-up
        prefill()
        decode()
    timings = {key: {"prefill": [], "prefill_and_decode": []} for key in runners}
    for _ in range(args.repeats):  # round robin: every runner sees the same machine state
        for key, (prefill, decode) in runners.items():
            timings[key]["prefill"].append(seconds(prefill))
            timings[key]["prefill_and_decode"].append(seconds(decode))

    rows = []
    for (name, variant), measured in timings.items():
        out, manifest = manifests[name]
        prefill_s = statistics.median(measured["prefill"])
        decode_s = statistics.median(measured["prefill_and_decode"]) - prefill_s
        if variant == "PyTorch fp32":
            ppl = manifest["pytorch_reference"]["perplexity"]["perplexity"]
            size = None
        else:
            ppl = manifest["variants"][variant]["perplexity"]["perplexity"]
            size = sum(f["bytes"] for n, f in manifest["files"].items() if n.startswith(variant))
        rows.append({"model": name, "runtime": variant, "perplexity": ppl, "bytes": size,
                     "prefill_ms": prefill_s * 1000, "decode_tokens_per_s": args.new_tokens / max(decode_s, 1e-9),
                     "export_seconds": manifest["export_seconds"]})
    write_json(args.out.with_suffix(".json"), {"rows": rows, "manifests": {k: v[1] for k, v in manifests.items()}})
    args.out.write_text(render(rows, args, manifests))
    print(args.out.read_text())


def render(rows, args, manifests) -> str:
    windows = next(iter(manifests.values()))[1]["pytorch_reference"]["perplexity"]
    lines = [
        "# ONNX export benchmark",
        "",
        f"Command: `python bench/onnx_export.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Machine: {cpu_name()}; onnxruntime CPU execution provider and PyTorch, same process, both on all cores. "
        f"Prefill: median latency of one forward pass over 1 x {args.prompt_tokens} tokens. Decode: {args.new_tokens} greedy "
        f"tokens through the KV cache after that prefill, tokens/s (median of {args.repeats} rounds, runners in round robin). "
        f"Perplexity: {windows['windows']} windows of {windows['seqlen']} tokens of {windows['data']}.",
        "",
        "| model | runtime | export s | size MiB | perplexity | prefill ms | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        size = "-" if row["bytes"] is None else f"{row['bytes'] / 2**20:.0f}"
        export = "-" if row["runtime"] == "PyTorch fp32" else f"{row['export_seconds']:.0f}"
        lines.append(f"| {row['model']} | {row['runtime']} | {export} | {size} | {row['perplexity']:.2f} | "
                     f"{row['prefill_ms']:.1f} | {row['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
