"""Greedy continuations from vLLM's offline engine, in a child process.

vLLM's engine starts worker processes and holds global state; a child process keeps that out of
the exporter and frees it all at exit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from exporters.verify import PROMPTS

VLLM_TIMEOUT_S = 900


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_greedy(model_dir: Path, dtype: str, expected: list[list[int]]) -> dict:
    """Compare vLLM's greedy continuations of PROMPTS with `expected` (transformers')."""
    if not vllm_available():
        return {"status": "skipped (vLLM is not installed)"}
    command = [sys.executable, "-m", "exporters.vllm_engine", str(model_dir), dtype, str(len(expected[0]))]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ}
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=VLLM_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"vLLM did not finish within {VLLM_TIMEOUT_S} s"}
    if run.returncode != 0:
        tail = " | ".join(run.stderr.strip().splitlines()[-3:])
        return {"status": "failed", "reason": f"vLLM could not load the checkpoint: {tail}"}
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got != expected:
        return {"status": "failed", "reason": f"vLLM's greedy continuation differs from transformers': {got} != {expected}", "vllm_greedy": got}
    return {"status": "passed", "vllm_greedy": got}


def _main(model_dir: str, dtype: str, new_tokens: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), ignore_eos=True)
    prompts = [{"prompt_token_ids": tokenizer(p)["input_ids"]} for p in PROMPTS]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    _main(*sys.argv[1:])
