"""2:4 linear layers on PyTorch's semi-structured sparse kernels, with a dense path for small batches.

vLLM and torchao dropped their 2:4 kernels in 2026; PyTorch core keeps
`torch.sparse.to_sparse_semi_structured` (CUTLASS and cuSPARSELt, CUDA compute capability 8.0+).
A weight is taken over only when it is exactly 2:4 along the input dimension and its shape and dtype
fit the backend; otherwise it stays dense and the reason is said. Sparse GEMMs lose to dense ones
at small token counts (decode), so each call takes the sparse path only from a measured token
threshold up, which keeps the dense weight too: that memory is what the choice costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wanda_serve.structure import is_nm_valid

BACKENDS = ("cutlass", "cusparselt")
MIN_COMPUTE_CAPABILITY = (8, 0)


def runtime_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """Why this machine cannot run the semi-structured kernels, or None when it can."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]}; the 2:4 kernels need 8.0 or newer"
    return None


def _tensor_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cutlass": SparseSemiStructuredTensorCUTLASS, "cusparselt": SparseSemiStructuredTensorCUSPARSELT}[backend]


def unsupported_reason(weight: torch.Tensor, backend: str) -> str | None:
    """Why `weight` (out, in) cannot go on the 2:4 kernels of `backend`, or None when it can."""
    if weight.dim() != 2:
        return f"weight has {weight.dim()} dimensions, not 2"
    rows, cols = weight.shape
    if cols % 4 or not is_nm_valid(weight, 2, 4):
        return "not 2:4 along the input dimension (some group of 4 inputs holds fewer than 2 zeros)"
    # PyTorch's own table of the smallest tiles each backend takes, per dtype (rows, columns).
    constraints = _tensor_class(backend)._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if constraints is None:
        return f"{weight.dtype} is not supported by the {backend} backend"
    min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}x{cols} is not a multiple of {min_rows}x{min_cols} ({backend}, {weight.dtype})"
    return None


def threshold_from_timings(timings: dict[int, tuple[float, float]]) -> int | None:
    """Smallest measured token count from which sparse beats dense at every larger count too.

    timings: tokens -> (dense seconds, sparse seconds). None: sparse never wins for good.
    """
    threshold = None
    for tokens in sorted(timings, reverse=True):
        dense, sparse = timings[tokens]
        if sparse >= dense:
            break
        threshold = tokens
    return threshold


def use_sparse(tokens: int, threshold: int | None) -> bool:
    return threshold is not None and tokens >= threshold


class Sparse24Linear(nn.Module):
    """A linear layer whose 2:4 weight is compressed for the sparse kernels; calls below the threshold stay dense."""

    def __init__(self, linear: nn.Linear, backend: str, threshold: int | None):
        super().__init__()
        weight = linear.weight.detach()
        reason = unsupported_reason(weight, backend)
        if reason is not None:
            raise ValueError(reason)
        self.backend, self.threshold = backend, threshold
        self.dense_weight = weight  # the dense path for small batches: this is the extra memory
        self.sparse_weight = _tensor_class(backend).from_dense(weight.contiguous())
        self.bias = linear.bias

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the dense layer: the compressed values and metadata."""
        packed = self.sparse_weight.packed
        meta = self.sparse_weight.meta
        return packed.numel() * packed.element_size() + (meta.numel() * meta.element_size() if meta is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not use_sparse(tokens, self.threshold):
            return F.linear(x, self.dense_weight, self.bias)
        flat = x.reshape(tokens, x.shape[-1])  # the kernels take 2-D inputs
        return F.linear(flat, self.sparse_weight, self.bias).reshape(*x.shape[:-1], -1)
