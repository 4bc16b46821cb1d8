"""Perplexity with the Wanda reference protocol: non-overlapping windows of the evaluation text, batch 1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

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


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (1, T) token ids -> (1, T, V) logits


def torch_logits_fn(model, device: torch.device | str = "cpu") -> LogitsFn:
    model.to(device)
    return lambda window: model(input_ids=window.to(device), use_cache=False).logits


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True,
    text_name: str = "the evaluation text",
) -> Perplexity:
    """exp of the mean next-token NLL over every predicted token of each window (seqlen - 1 per window).

    logits_fn runs the model under test: PyTorch (torch_logits_fn) or any other runtime.
    """
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise WandaServeError(f"{text_name} is too short to evaluate: {ids.numel()} tokens, one window needs {seqlen}")
    nll = 0.0
    for i in tqdm(range(windows), desc="perplexity", disable=not progress):
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)  # (1, T)
        logits = logits_fn(window)[0, :-1].float().cpu()  # (T-1, V)
        nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    predicted = windows * (seqlen - 1)
    return Perplexity(math.exp(nll / predicted), windows, seqlen, predicted)
