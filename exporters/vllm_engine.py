"""Greedy continuations from vLLM's offline engine, run by the Python that has vLLM (contract.vllm_python).

This file runs as a standalone script under that Python: it imports nothing from this project, reads its
request as JSON on stdin and writes the token ids as JSON to the file the request names. A child process also keeps vLLM's
engine processes and global state out of the exporter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 900


def vllm_greedy(python: str, model_dir: Path, dtype: str, prompt_token_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """vLLM's greedy continuations (end-of-sequence ignored) of each prompt, run by `python`. Raises RuntimeError on failure."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ}
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "greedy.json"  # vLLM logs to stdout too
        request = {"model": str(model_dir), "dtype": dtype, "prompt_token_ids": prompt_token_ids,
                   "max_tokens": new_tokens, "result": str(result)}
        try:
            run = subprocess.run([python, __file__], input=json.dumps(request), capture_output=True, text=True,
                                 timeout=TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"vLLM did not finish within {TIMEOUT_S} s") from e
        if run.returncode != 0 or not result.is_file():
            tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"vLLM could not run the checkpoint: {tail}")
        return json.loads(result.read_text())


def _main() -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(sys.stdin.read())
    llm = LLM(model=request["model"], dtype=request["dtype"], enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    Path(request["result"]).write_text(json.dumps([list(output.outputs[0].token_ids) for output in outputs]))


if __name__ == "__main__":
    _main()
