"""Exports of the real SmolLM2-135M-Instruct, dense and pruned with the default recipe, each checked in its runtime.

Prunes the embedded model with the default recipe (every option spelled out), then exports the
dense and the pruned model with `wanda-serve export vllm` (bfloat16; reloaded through transformers,
and run on vLLM's offline engine when WANDA_SERVE_VLLM_PYTHON names a Python with vLLM) and
`wanda-serve export onnx` (float32, checked on onnxruntime), each in its own process, and reports
what every export's manifest records. Writes a Markdown page and the raw JSON.

    WANDA_SERVE_VLLM_PYTHON=.venv-vllm/bin/python python bench/exports.py --out docs/exports.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import DEFAULT_RECIPE, Settings, argv, provenance, wanda_serve, write_json  # noqa: E402

from wanda_serve.contract import MANIFEST_NAME, VLLM_PYTHON_ENV, vllm_python  # noqa: E402


def export(kind: str, source: list[str], dtype: str, out: Path) -> dict:
    """Run `wanda-serve export KIND`; its manifest, with the process's wall seconds."""
    command = ["export", kind, *source, "--dtype", dtype, "--out", str(out), "--overwrite"]
    started = time.perf_counter()
    wanda_serve(*command)
    return json.loads((out / MANIFEST_NAME).read_text()) | {
        "process_seconds": time.perf_counter() - started, "command": shlex.join(["wanda-serve", *command])}


def vllm_version() -> str:
    python = vllm_python()
    if python is None:
        return "not installed"
    return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-exports"))
    parser.add_argument("--out", type=Path, default=Path("docs/exports.md"))
    args = parser.parse_args()

    machine = provenance() | {"cores": os.cpu_count(), "vllm": vllm_version(), "onnxruntime": metadata.version("onnxruntime")}
    pruned = args.work / "wanda-2of4"
    prune_options = Settings().prune_options(DEFAULT_RECIPE)
    wanda_serve("prune", *argv(prune_options), "--no-eval", "--overwrite", "--out", str(pruned))
    sources = {"dense": [], "Wanda 2:4": [str(pruned)]}
    exports = {}
    for label, source in sources.items():
        name = "dense" if not source else pruned.name
        exports[label] = {
            "vllm": export("vllm", source, "bfloat16", args.work / f"vllm-{name}"),
            "onnx": export("onnx", source, "float32", args.work / f"onnx-{name}"),
        }

    vllm_env = os.environ.get(VLLM_PYTHON_ENV)
    command = shlex.join([*([f"{VLLM_PYTHON_ENV}={vllm_env}"] if vllm_env else []), "python", "bench/exports.py", *sys.argv[1:]])
    result = {"command": command, "machine": machine, "prune_options": prune_options, "exports": exports}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    args.out.write_text(render(result))
    print(args.out.read_text())


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Exports of the real SmolLM2-135M-Instruct, checked in their runtimes",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, no GPU; vLLM {machine['vllm']} (the vLLM check's Python), "
        f"onnxruntime {machine['onnxruntime']} (CPU execution provider), torch {machine['torch']}, "
        f"transformers {machine['transformers']}.",
        "",
        f"Sources: the dense embedded model, and the same pruned by `wanda-serve prune {shlex.join(argv(result['prune_options']))}` "
        "(the default recipe, Wanda + permutation 2:4). Each export is its own `wanda-serve export` process; "
        "its manifest (`export_manifest.json`) records the checks below, and an export whose check fails is removed.",
        "",
        "## vLLM checkpoint",
        "",
        "```sh",
        *(export["vllm"]["command"] for export in result["exports"].values()),
        "```",
        "",
        "| source | weights (bf16) | sparsity (exported tensors) | 2:4 valid | source zeros kept | reload max abs logit diff "
        "| vLLM greedy (32 tokens x 2 prompts) | export s |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for label, export in result["exports"].items():
        manifest = export["vllm"]
        exported = manifest["sparsity"]["exported"]
        layers = exported["layers"].values()
        valid = sum(layer["nm_valid"]["2:4"] for layer in layers)
        zeros = manifest["zeros_kept"]
        weights = sum(f["bytes"] for name, f in manifest["files"].items() if name.endswith(".safetensors"))
        lines.append(
            f"| {label} | {weights:,} B | {exported['overall_sparsity']:.4f} | {valid} of {len(layers)} layers | "
            f"{zeros['kept']:,} of {zeros['source']:,} | {manifest['checks']['transformers_reload_max_abs_logit_diff']:g} | "
            f"{manifest['checks']['vllm']['status']} | {manifest['process_seconds']:.0f} |"
        )
    lines += [
        "",
        "Export s: the whole process (loading, casting, saving, reloading, the vLLM check with its engine start). The "
        "vLLM check runs in float32: in bfloat16 vLLM's CPU kernels and transformers round differently, and on near-tied "
        "tokens their greedy choices differ, which would fail the check for reasons that have nothing to do with the "
        "export. Stock vLLM serves the 2:4 checkpoint as dense weights, at dense speed (vLLM removed its 2:4 kernels; "
        "`serve --sparse-runtime` puts PyTorch's back behind vLLM on GPUs, see the README).",
        "",
        "## ONNX",
        "",
        "```sh",
        *(export["onnx"]["command"] for export in result["exports"].values()),
        "```",
        "",
        "| source | graph + weights | source zeros in the initializers | max abs logit diff vs PyTorch | greedy tokens "
        "agreeing (of 32, per prompt) | graph export s | export s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for label, export in result["exports"].items():
        manifest = export["onnx"]
        check = manifest["variants"]["model.onnx"]["check"]
        size = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("model.onnx"))
        zeros = manifest["zeros"]
        lines.append(
            f"| {label} | {size / 2**20:.0f} MiB | {zeros['exported_zeros']:,} of {zeros['source_zeros']:,} | "
            f"{check['max_abs_logit_diff']:.1e} | {' and '.join(map(str, check['greedy_tokens_agreeing']))} | "
            f"{manifest['export_seconds']:.0f} | {manifest['process_seconds']:.0f} |"
        )
    lines += [
        "",
        "Graph export s: `torch.onnx.export` alone; export s: the whole process (loading, the PyTorch reference, export, "
        "the checks on onnxruntime). The int8 and int4 variants, their perplexity and onnxruntime's speed against "
        "PyTorch are in [onnx_benchmark.md](onnx_benchmark.md).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
