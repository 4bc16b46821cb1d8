"""Seeded benchmark workloads: prompts of exact token lengths, the same for every model benchmarked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.client import Request
from wanda_serve.data import evaluation_ids, load_corpus
from wanda_serve.errors import WandaServeError

PROMPT_SOURCES = ("text", "random")
# The benchmark's default schedule: max-concurrency levels, and rounds (each runs every model once).
CONCURRENCY_LEVELS = (1, 2, 4, 8)
ROUNDS = 2


@dataclass
class WorkloadSpec:
    source: str = "text"  # "text": windows of held-out evaluation text; "random": uniformly random token ids
    data: str = "wiki"  # the text for source "text" (as `wanda-serve eval --data`)
    input_len: int = 128
    output_len: int = 32
    num_prompts: int = 16  # per concurrency level and round
    seed: int = 0

    def __post_init__(self):
        if self.source not in PROMPT_SOURCES:
            raise WandaServeError(f"unknown prompt source {self.source!r}; choose from {', '.join(PROMPT_SOURCES)}")
        for name in ("input_len", "output_len", "num_prompts"):
            if getattr(self, name) < 1:
                raise WandaServeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def build_requests(spec: WorkloadSpec, tokenizer, count: int) -> list[Request]:
    """`count` distinct prompts of spec.input_len tokens, each asking for spec.output_len tokens.

    Distinct prompts keep vLLM's prefix cache from serving a repeated prompt for free.
    """
    rng = np.random.default_rng(spec.seed)
    if spec.source == "text":
        ids = evaluation_ids(load_corpus(spec.data), tokenizer).numpy()
        if len(ids) < spec.input_len + count:
            raise WandaServeError(f"{spec.data} has {len(ids)} tokens, too few for {count} distinct prompts of {spec.input_len}")
        starts = rng.choice(len(ids) - spec.input_len + 1, size=count, replace=False)
        prompts = [ids[s:s + spec.input_len] for s in starts]
    else:
        special = set(tokenizer.all_special_ids)
        vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
        prompts = [rng.choice(vocabulary, size=spec.input_len) for _ in range(count)]
    return [Request(tuple(int(t) for t in prompt), spec.output_len) for prompt in prompts]


def write_custom_dataset(requests: list[Request], tokenizer, path: Path) -> None:
    """The requests as `vllm bench serve --dataset-name custom` reads them (decoded text, one JSON line each)."""
    with path.open("w") as stream:
        for request in requests:
            prompt = tokenizer.decode(list(request.prompt_token_ids))
            stream.write(json.dumps({"prompt": prompt, "output_tokens": request.output_len}) + "\n")
