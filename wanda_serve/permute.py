"""Channel permutation before an N:M mask, folded exactly into the model.

An N:M mask keeps M−N weights in every group of M consecutive inputs, so when a row's important
inputs sit in the same group some of them must go. Reordering the input channels to spread the
important ones over the groups keeps more. The reordering must leave a standard checkpoint, so it
is only applied where it folds exactly into the neighbouring layers: a layer whose inputs are
produced channel by channel by sibling layers with only elementwise operations between (a gated
MLP's gate/up rows feeding down's columns; OPT's fc1 rows feeding fc2). Permuting the producers'
output rows (and biases) and the consumer's input columns together computes the same function.

Candidates are found by shape among siblings and kept only if a random permutation provably leaves
the block's outputs unchanged on the calibration inputs: no per-model tables. (Attention's v→o
folds only within each head, and q/k not at all because of rotary embeddings; the residual stream
would need one permutation shared by every layer. None of those is attempted.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wanda_serve.structure import Structure, prune_mask


@dataclass(frozen=True)
class Fold:
    """Permuting `consumer`'s input columns and the `producers`' output rows together changes nothing."""

    producers: tuple[str, ...]
    consumer: str

    def apply(self, linears: dict[str, nn.Linear], perm: torch.Tensor) -> None:
        consumer = linears[self.consumer]
        consumer.weight.data = consumer.weight.data[:, perm]
        for name in self.producers:
            producer = linears[name]
            producer.weight.data = producer.weight.data[perm]
            if producer.bias is not None:
                producer.bias.data = producer.bias.data[perm]


def _candidates(linears: dict[str, nn.Linear], hidden_size: int) -> list[Fold]:
    siblings: dict[str, list[str]] = {}
    for name in linears:
        siblings.setdefault(name.rpartition(".")[0], []).append(name)
    folds = []
    for names in siblings.values():
        for consumer in names:
            width = linears[consumer].in_features
            if width == hidden_size:
                continue  # reads the residual stream (or attention heads): not made channel by channel by a sibling
            producers = tuple(n for n in names if n != consumer and linears[n].out_features == width)
            if producers:
                folds.append(Fold(producers, consumer))
    return folds


@torch.no_grad()
def exact_folds(block: nn.Module, linears: dict[str, nn.Linear], run_block, tolerance: float = 1e-4) -> list[Fold]:
    """The candidate folds of `block` under which a random permutation leaves `run_block()` unchanged."""
    reference = run_block()  # (B, T, hidden)
    generator = torch.Generator().manual_seed(0)
    exact = []
    for fold in _candidates(linears, reference.shape[-1]):
        perm = torch.randperm(linears[fold.consumer].in_features, generator=generator).to(reference.device)
        fold.apply(linears, perm)
        permuted = run_block()
        fold.apply(linears, torch.argsort(perm))
        if (permuted - reference).abs().max() <= tolerance * reference.abs().max():
            exact.append(fold)
    return exact


# A permutation is kept only if it keeps more than this share of score beyond the identity's. Kernels
# that round differently (another CPU, another thread count) move the scores by ~1e-7 of their value:
# a gain within that noise must not decide differently on different machines.
GAIN_TOLERANCE = 1e-6


def kept_score(scores: torch.Tensor, structure: Structure) -> float:
    # Summed in float64: a float32 sum of ~1e6 scores depends on how the threads split it, in the 7th decimal.
    return float(scores.masked_fill(prune_mask(scores, structure), 0).sum(dtype=torch.float64))


def spreading_permutation(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Input-column order that deals the channels, by total score, over the groups of M in snake order.

    Group g gets one channel from each band of (columns / M) channels: the strongest band goes
    0, 1, ..., G−1, the next G−1, ..., 0, and so on, so no group collects the strong ones.
    Totals are float64 sums; among equal totals the lower column counts as stronger (stable sort).
    Returns `perm`: new column j is old column perm[j]; the identity unless that keeps more than
    GAIN_TOLERANCE more score.
    """
    cols = scores.shape[1]
    groups = cols // structure.m
    strongest_first = torch.sort(scores.sum(0, dtype=torch.float64), descending=True, stable=True).indices
    rank = torch.arange(cols, device=scores.device)
    band, within = rank // groups, rank % groups
    group = torch.where(band % 2 == 0, within, groups - 1 - within)
    slot = group * structure.m + band  # each group's members are consecutive columns
    perm = torch.empty_like(strongest_first)
    perm[slot] = strongest_first
    if kept_score(scores[:, perm], structure) <= kept_score(scores, structure) * (1 + GAIN_TOLERANCE):
        return rank
    return perm
