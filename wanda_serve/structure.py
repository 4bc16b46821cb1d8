"""Sparsity structures, the one mask builder every method shares, and the sparsity audit.

Tie rule, used everywhere: scores are sorted ascending with a stable sort, so among equal
scores the weight with the lower input-column index is pruned first. Dequantized weights
(SmolLM2 is Q4_1 underneath) hold many exact ties, and an unstated rule changes results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from wanda_serve.errors import WandaServeError


@dataclass(frozen=True)
class Structure:
    """Either an unstructured ratio of zeros per output row, or N zeros in every M inputs."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.is_nm:
            if self.ratio is not None:
                raise WandaServeError("give either a ratio or N:M, not both")
            if not (0 < self.n < self.m):
                raise WandaServeError(f"invalid N:M {self.n}:{self.m}: need 0 < N < M")
        elif self.ratio is None or not (0.0 < self.ratio < 1.0):
            raise WandaServeError(f"sparsity ratio must be in (0, 1), got {self.ratio}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None or self.m is not None

    @property
    def target(self) -> float:
        return self.n / self.m if self.is_nm else self.ratio

    @classmethod
    def parse(cls, text: str) -> Structure:
        """'2:4' (N zeros per M), '0.5' or '50%' (unstructured)."""
        text = text.strip()
        if match := re.fullmatch(r"(\d+):(\d+)", text):
            return cls(n=int(match[1]), m=int(match[2]))
        try:
            ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError as e:
            raise WandaServeError(f"invalid structure {text!r}: use N:M (e.g. 2:4) or a ratio (e.g. 0.5)") from e
        return cls(ratio=ratio)

    def check_width(self, in_features: int, layer_name: str) -> None:
        if self.is_nm and in_features % self.m:
            raise WandaServeError(f"N:M {self} does not fit {layer_name}: M={self.m} does not divide its {in_features} inputs")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def prune_mask(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores, compared within each output row."""
    rows, cols = scores.shape
    if structure.is_nm:
        groups = scores.reshape(rows, cols // structure.m, structure.m)
        order = torch.sort(groups, dim=-1, stable=True).indices
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order[..., : structure.n], True)
        return mask.reshape(rows, cols)
    order = torch.sort(scores, dim=-1, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[:, : int(cols * structure.ratio)], True)
    return mask


def is_nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row holds at least n zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())


class KeptZeros:
    """Keeps the zeros of some weights exactly zero while they train: a hook zeroes their gradients (so
    optimizer state never builds up for them), and `remask` after each optimizer step undoes whatever
    weight decay or rounding moved."""

    def __init__(self, weights: list[torch.nn.Parameter]):
        self.kept = {weight: weight.detach() != 0 for weight in weights}
        self.hooks = []

    def attach(self) -> None:
        for weight, kept in self.kept.items():
            self.kept[weight] = kept = kept.to(weight.device)  # where the weight is now, after any move
            self.hooks.append(weight.register_hook(lambda grad, kept=kept: grad * kept))

    @torch.no_grad()
    def remask(self) -> None:
        for weight, kept in self.kept.items():
            weight.mul_(kept)

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


AUDITED_PATTERNS = ((2, 4), (4, 8))


def audit_linears(linears: dict[str, torch.nn.Linear], structure: Structure | None = None) -> dict:
    """Per-layer sparsity and N:M validity, measured on the tensors as they are."""
    patterns = set(AUDITED_PATTERNS)
    if structure is not None and structure.is_nm:
        patterns.add((structure.n, structure.m))
    layers = {}
    zeros = total = 0
    for name, linear in linears.items():
        weight = linear.weight.detach()
        layer_zeros = int((weight == 0).sum())
        zeros += layer_zeros
        total += weight.numel()
        layers[name] = {
            "shape": list(weight.shape),
            "sparsity": layer_zeros / weight.numel(),
            "nm_valid": {f"{n}:{m}": is_nm_valid(weight, n, m) for n, m in sorted(patterns)},
        }
    return {
        "overall_sparsity": zeros / total if total else 0.0,
        "all_nm_valid": {f"{n}:{m}": all(l["nm_valid"][f"{n}:{m}"] for l in layers.values()) for n, m in sorted(patterns)},
        "layers": layers,
    }
