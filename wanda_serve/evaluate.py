"""Perplexity with the Wanda reference protocol: non-overlapping windows of the evaluation text, batch 1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wanda_serve.errors import WandaServeError


@dataclass
class Perplexity:
    perplexity: float
    windows: int
    seqlen: int
    predicted_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seqlen: int, device: torch.device | str = "cpu", max_windows: int | None = None, progress: bool = True
) -> Perplexity:
    """exp of the mean next-token NLL over every predicted token of each window (seqlen - 1 per window)."""
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise WandaServeError(f"evaluation text is too short: {ids.numel()} tokens, one window needs {seqlen}")
    model.to(device)
    nll = 0.0
    for i in tqdm(range(windows), desc="perplexity", disable=not progress):
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)  # (1, T)
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()  # (T-1, V)
        nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    predicted = windows * (seqlen - 1)
    return Perplexity(math.exp(nll / predicted), windows, seqlen, predicted)
