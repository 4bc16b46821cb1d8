"""Pruning methods: each is a small function of a layer's weight and its input statistic.

A method either scores weights (the shared mask builder then zeroes the lowest scores) or
chooses its mask while updating the surviving weights (SparseGPT). The layer-by-layer engine in
engine.py is shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from wanda_serve.errors import WandaServeError
from wanda_serve.structure import Structure, prune_mask


class InputNorms:
    """Squared L2 norm of each input channel over all calibration tokens, accumulated in float64.

    float64 because the sum's order changes with the batch size and the kernels' vector width: in
    float32 that moves the norms by ~1e-7, enough to flip near-tied masks, and every flip feeds
    the next block other inputs. The squares of float32 values are exact in float64, and their
    sum's rounding (~1e-16) no longer reaches the scores.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.squared_norms = torch.zeros(in_features, dtype=torch.float64, device=device)

    # Rows converted to float64 at a time: a whole batch in float64, squared, was the prune's largest transient
    # (a 1.5B model's down_proj: 4096 tokens × 8960 inputs × 8 B, twice: 0.6 GB).
    rows_per_chunk = 256

    def add_batch(self, inp: torch.Tensor) -> None:
        for rows in inp.reshape(-1, inp.shape[-1]).split(self.rows_per_chunk):  # (rows, in)
            self.squared_norms += rows.double().pow(2).sum(0)

    def permute(self, perm: torch.Tensor) -> None:
        self.squared_norms = self.squared_norms[perm]


class InputHessian:
    """H = 2 X Xᵀ / n over calibration tokens, the layer-wise reconstruction Hessian.

    Accumulated in float32, unlike InputNorms: X Xᵀ is a GEMM over every token, the main cost of the
    Hessian methods, and float64 would double it. So sparsegpt and --reconstruct can still change in
    the last bits with --batch-size (docs/determinism.md).
    """

    def __init__(self, in_features: int, device: torch.device):
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        tokens = inp.reshape(-1, inp.shape[-1]).float()  # (B*T, in)
        self.xxt += tokens.T @ tokens
        self.tokens += tokens.shape[0]

    def permute(self, perm: torch.Tensor) -> None:
        self.xxt = self.xxt[perm][:, perm]

    @property
    def hessian(self) -> torch.Tensor:
        """A new tensor each time, the caller's to change: 2 XXᵀ / n, made with one temporary the size of XXᵀ, not two."""
        return (self.xxt * 2).div_(max(self.tokens, 1))

    @property
    def squared_norms(self) -> torch.Tensor:
        # ||X_j||² is XXᵀ's diagonal: score functions that use InputNorms work on a Hessian too.
        return torch.diagonal(self.xxt)


def magnitude_scores(weight: torch.Tensor, stat: None) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, stat: InputNorms) -> torch.Tensor:
    # Wanda: |W_ij| * ||X_j||_2, compared within each output row i (in float64 with InputNorms' float64 norms).
    return weight.abs() * stat.squared_norms.sqrt().unsqueeze(0)


RIA_EXPONENT = 0.5  # a in RIA's ||X||₂^a, the paper's choice


def ria_scores(weight: torch.Tensor, stat: InputNorms) -> torch.Tensor:
    # RIA (Zhang et al. 2024): relative importance of |W_ij| within its row and within its column,
    # times the input activation norm to the power a.
    # float64: the row and column sums then do not depend on the order the kernels add in.
    magnitude = weight.abs().double()
    relative = magnitude / magnitude.sum(dim=1, keepdim=True) + magnitude / magnitude.sum(dim=0, keepdim=True)
    return relative * stat.squared_norms.sqrt().pow(RIA_EXPONENT).unsqueeze(0)


def prune_by_scores(score_fn: Callable) -> Callable:
    def prune(weight: torch.Tensor, stat, structure: Structure) -> torch.Tensor:
        mask = prune_mask(score_fn(weight.float(), stat), structure)
        return weight.masked_fill(mask, 0)

    return prune


def reconstruct_after_scores(score_fn: Callable) -> Callable:
    """Mask from the scores, then SparseGPT's OBS update of the surviving weights with that mask fixed."""

    def prune(weight: torch.Tensor, stat: InputHessian, structure: Structure) -> torch.Tensor:
        return sparsegpt_prune(weight, stat, structure, mask=prune_mask(score_fn(weight.float(), stat), structure))

    return prune


def upper_cholesky_of_inverse_(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ (symmetric positive definite H, read from its lower triangle), computed in H's
    memory, which it overwrites: the reference's cholesky(cholesky_inverse(cholesky(H)), upper=True) to the bit, in
    the same column-major layout, without that chain's two temporaries the size of H (0.3 GB each for a 1.5B model's
    down_proj). LAPACK works on column-major matrices; once H's memory is transposed, its transpose view is H in that
    order, the copy torch would otherwise make, and each step runs in place on it."""
    H = _transpose_(H).mT
    torch.linalg.cholesky(H, out=H)
    torch.cholesky_inverse(H, out=H)
    return torch.linalg.cholesky(H, upper=True, out=H)


def _transpose_(matrix: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Transpose a square matrix's memory in place, a strip of `block` rows at a time (temporaries: one strip)."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = slice(start, stop)
        right = matrix[rows, stop:].clone()
        matrix[rows, stop:] = matrix[stop:, rows].T
        matrix[stop:, rows] = right.T
        matrix[rows, rows] = matrix[rows, rows].T.clone()
    return matrix


def sparsegpt_prune(
    weight: torch.Tensor, stat: InputHessian, structure: Structure, blocksize: int = 128, percdamp: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): OBS mask selection and weight update, column by column.

    The mask comes from the shared builder on the OBS saliency w² / [H⁻¹]²_jj: per 128-column
    block and row for unstructured ratios, per group of M columns (chosen lazily, after earlier
    columns' updates) for N:M. A given `mask` (True = prune) is used as it is: then only the
    update of the surviving weights is SparseGPT's.
    """
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = stat.hessian
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        Hinv = upper_cholesky_of_inverse_(H)
    except torch.linalg.LinAlgError as e:
        raise WandaServeError(f"SparseGPT: the layer Hessian is not positive definite ({e}); use more calibration samples") from e

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = torch.diag(Hinv1)
        choose_groups = mask is None and structure.is_nm
        if mask is not None:
            mask1 = mask[:, i1:i2]
        elif structure.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = prune_mask(W1.pow(2) / diag1.pow(2).unsqueeze(0), structure)
        for i in range(i2 - i1):
            if choose_groups and i % structure.m == 0:
                group = slice(i, i + structure.m)
                mask1[:, group] = prune_mask(W1[:, group].pow(2) / diag1[group].pow(2).unsqueeze(0), structure)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


@dataclass(frozen=True)
class AlpsConfig:
    """ALPS settings; the defaults are the reference code's.

    rho: initial ADMM penalty ρ, adapted every update_every iterations to how much the support moves.
    max_iterations: most ADMM iterations.
    update_every: ADMM iterations between support checks and ρ updates.
    min_iterations: ADMM iterations before a small support change may stop the loop.
    stop_support_change: support change, as a fraction of the kept weights, that then stops it.
    pcg_steps: conjugate gradient steps that refit the kept weights on the final support.
    damping: ridge added to XXᵀ, as a fraction of its mean diagonal.
    """

    rho: float = 0.1
    max_iterations: int = 300
    update_every: int = 3
    min_iterations: int = 30
    stop_support_change: float = 3e-4
    pcg_steps: int = 10
    damping: float = 0.01

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def alps_prune(
    weight: torch.Tensor, stat: InputHessian, structure: Structure, config: AlpsConfig = AlpsConfig(),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALPS (Meng et al. 2024): ADMM on ||X(W - Ŵ)||² with Ŵ projected on the pattern, then PCG on its support.

    Follows the reference alps.py (mazumder-lab/ALPS, MIT) in its coordinates B = (W * ||X_j||)ᵀ,
    where the damped XXᵀ has a unit diagonal. A given `mask` (True = prune) skips the ADMM: only the
    refit of the surviving weights on that support is ALPS's.
    """
    W = weight.detach().clone().float()
    xtx = stat.xxt.clone()
    dead = torch.diag(xtx) == 0  # as in sparsegpt_prune: dead inputs get weight 0 and a unit diagonal
    xtx[dead, dead] = 1
    W[:, dead] = 0
    xtx.diagonal().add_(config.damping * torch.mean(torch.diag(xtx)))
    x_norm = torch.diag(xtx).sqrt() + 1e-8
    xtx = xtx / x_norm / x_norm.unsqueeze(1)
    B0 = (W * x_norm).T  # (in, out)
    target = xtx @ B0  # the reference's YᵀX, transposed

    def pruned_of(value: torch.Tensor) -> torch.Tensor:
        # Compared within each output row, for ratios too, like every method here (the reference
        # keeps one layer-wide top-k for unstructured sparsity).
        return mask.T if mask is not None else prune_mask(value.T.abs(), structure).T

    B = B0
    if mask is None:
        L, Q = torch.linalg.eigh(xtx.double())  # once: (XXᵀ + ρI)⁻¹ = Q diag(1/(L+ρ)) Qᵀ for every ρ
        Q = Q.float()
        inverse = lambda rho: (Q * (1 / (L + rho)).float()) @ Q.T  # noqa: E731
        rho, increased = config.rho, False
        kept = round(B0.numel() * (1 - structure.target))
        D0 = B0.masked_fill(pruned_of(B0), 0)
        D, V = D0, torch.zeros_like(B0)
        xtx_inv, support = inverse(rho), D0 == 0
        for i in range(config.max_iterations):
            B = xtx_inv @ (target - V + rho * D)
            D = B + V / rho
            D = D.masked_fill(pruned_of(D), 0)
            V = V + rho * (B - D)
            if (i + 1) % config.update_every:
                continue
            # ρ grows while the support moves, until it settles; a support that never moved means ρ
            # was too large from the start: shrink it (restarting, if the support moved a little).
            new_support = D == 0
            change = int((new_support != support).sum())
            if change / kept > 0.1:
                rho, increased = rho * 1.3, True
            elif change / kept > 0.005:
                rho, increased = rho * 1.2, True
            elif change > 0 and increased:
                rho *= 1.1
            elif change > 0:
                rho /= 5
                B, D, V = B0, D0, torch.zeros_like(B0)
            elif increased:
                break
            else:
                rho /= 5
            support, rho = new_support, min(rho, 1e6)
            xtx_inv = inverse(rho)
            if i >= config.min_iterations and change / kept < config.stop_support_change:
                break

    # Refit the kept weights on the fixed support: the reference's cg_batch without preconditioner (the
    # unit diagonal already is Jacobi's), one system per output, the residual masked to the support.
    keep = ~pruned_of(B)
    B = B.masked_fill(~keep, 0)
    R = (target - xtx @ B) * keep
    tolerance = 1e-4 * target.norm(dim=0)
    P, rr_old = torch.zeros_like(B), torch.ones_like(tolerance)
    nonzero = lambda d: d.masked_fill(d == 0, 1e-8)  # noqa: E731
    for _ in range(config.pcg_steps):
        rr = (R * R).sum(0)
        if (rr.sqrt() <= tolerance).all():
            break
        P = R + rr / nonzero(rr_old) * P
        AP = xtx @ P
        alpha = rr / nonzero((P * AP).sum(0))
        B = B + alpha * P
        R = (R - alpha * AP) * keep
        rr_old = rr
    return (B.T / x_norm).to(weight.dtype)


@dataclass(frozen=True)
class Method:
    """statistic: the per-layer input statistic the method needs (None: weights alone).
    scores: the score function, for methods that only score (None: the method chooses its own mask)."""

    statistic: type | None
    prune: Callable[[torch.Tensor, object, Structure], torch.Tensor]
    scores: Callable[[torch.Tensor, object], torch.Tensor] | None = None


def scoring_method(statistic: type | None, score_fn: Callable) -> Method:
    return Method(statistic, prune_by_scores(score_fn), score_fn)


METHODS: dict[str, Method] = {
    "magnitude": scoring_method(None, magnitude_scores),
    "wanda": scoring_method(InputNorms, wanda_scores),
    "ria": scoring_method(InputNorms, ria_scores),
    "sparsegpt": Method(statistic=InputHessian, prune=sparsegpt_prune),
    "alps": Method(statistic=InputHessian, prune=alps_prune),
}


def get_method(name: str, reconstruct: bool = False) -> Method:
    """The named method; with `reconstruct`, its mask followed by the OBS update of the surviving weights."""
    try:
        method = METHODS[name]
    except KeyError as e:
        raise WandaServeError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from e
    if not reconstruct:
        return method
    if method.scores is None:
        raise WandaServeError(f"--reconstruct applies to scoring methods ({', '.join(n for n, m in METHODS.items() if m.scores)}); "
                              f"{name} already updates the weights it keeps")
    return Method(InputHessian, reconstruct_after_scores(method.scores))
