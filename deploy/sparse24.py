"""2:4 linear layers on PyTorch's semi-structured sparse kernels, with a dense path for small batches.

vLLM and torchao dropped their 2:4 kernels in 2026; PyTorch core keeps
`torch.sparse.to_sparse_semi_structured` (CUTLASS and cuSPARSELt, CUDA compute capability 8.0+).
A weight is taken over only when it is exactly 2:4 along the input dimension, sits on a CUDA device
that has the kernels, fits the backend's tiles, and beats dense from some measured token count up;
otherwise it stays dense and `plan_layer` says why. Sparse GEMMs lose to dense ones at small token
counts (decode), so below the threshold the dense weight is kept and used: that is the memory the
choice costs, and it is reported. This module needs torch only: the vLLM plugin
(deploy/vllm_plugin.py) and bench/gpu_sparse.py both run on it.
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

PLUGIN_NAME = "wanda24"  # the vLLM plugin's entry point and --quantization name (deploy/vllm_plugin.py)
PLAN_REPORT_ENV = "WANDA_SERVE_SPARSE_REPORT"  # where the plugin appends each layer's record, when set
BACKENDS = ("cusparselt", "cutlass")  # order of preference when both fit
MIN_COMPUTE_CAPABILITY = (8, 0)
THRESHOLD_TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # token counts timed at load time
THRESHOLD_REPEATS = 10


def runtime_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """Why `device` cannot run the semi-structured kernels, or None when it can."""
    device = torch.device(device)
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    if device.type != "cuda":
        return f"the weight is on {device}, not on a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]}; the 2:4 kernels need 8.0 or newer"
    return None


def _tensor_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cutlass": SparseSemiStructuredTensorCUTLASS, "cusparselt": SparseSemiStructuredTensorCUSPARSELT}[backend]


def not_2_of_4_reason(weight: torch.Tensor) -> str | None:
    """Why `weight` (out, in) is not 2:4 along the input dimension, or None when it is."""
    if weight.dim() != 2:
        return f"weight has {weight.dim()} dimensions, not 2"
    rows, cols = weight.shape
    if cols % 4:
        return f"{cols} inputs are not a multiple of 4"
    zeros_per_group = (weight.reshape(rows, cols // 4, 4) == 0).sum(-1)
    short = int((zeros_per_group < 2).sum())
    if short:
        return f"not 2:4 along the input dimension ({short} groups of 4 inputs hold fewer than 2 zeros)"
    return None


def unsupported_reason(weight: torch.Tensor, backend: str) -> str | None:
    """Why `weight` (out, in) cannot go on the 2:4 kernels of `backend`, or None when it can."""
    reason = not_2_of_4_reason(weight)
    if reason is not None:
        return reason
    rows, cols = weight.shape
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


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` after one warm-up call: CUDA events on a GPU, the wall clock elsewhere."""
    fn()  # warm-up: kernel selection, compression caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def compress(weight: torch.Tensor, backend: str) -> torch.Tensor:
    return _tensor_class(backend).from_dense(weight.contiguous())


@torch.no_grad()
def measure_timings(weight: torch.Tensor, sparse: torch.Tensor, tokens_list=THRESHOLD_TOKENS,
                    repeats: int = THRESHOLD_REPEATS) -> dict[int, tuple[float, float]]:
    """tokens -> (dense ms, sparse ms) of one GEMM with this weight, on its device."""
    timings = {}
    for tokens in tokens_list:
        x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
        timings[tokens] = (median_ms(lambda: F.linear(x, weight), repeats, weight.device),
                           median_ms(lambda: F.linear(x, sparse), repeats, weight.device))
    return timings


@lru_cache(maxsize=None)
def _threshold_for_shape(rows: int, cols: int, dtype: torch.dtype, backend: str, device: str) -> int | None:
    """Measured once per shape: every layer of that shape shares the GEMM and so the threshold."""
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    weight.view(rows, cols // 4, 4)[..., 2:] = 0
    return threshold_from_timings(measure_timings(weight, compress(weight, backend)))


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class Sparse24Weight:
    """A 2:4 weight compressed for one backend, plus the dense weight when calls below the threshold need it."""

    def __init__(self, weight: torch.Tensor, backend: str, threshold: int):
        self.backend, self.threshold = backend, threshold
        self.sparse = compress(weight, backend)
        self.dense_bytes = _nbytes(weight)
        # From the first timed count up, sparse always wins: the dense copy is not needed.
        self.dense = weight if threshold > THRESHOLD_TOKENS[0] else None

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the dense layer (negative: a saving)."""
        compressed = _nbytes(self.sparse.packed) + _nbytes(self.sparse.meta)
        return compressed if self.dense is not None else compressed - self.dense_bytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if self.dense is not None and not use_sparse(tokens, self.threshold):
            return F.linear(x, self.dense, bias)
        flat = x.reshape(tokens, x.shape[-1])  # the kernels take 2-D inputs
        return F.linear(flat, self.sparse, bias).reshape(*x.shape[:-1], -1)


def plan_layer(weight: torch.Tensor, threshold_for_shape=_threshold_for_shape) -> tuple[Sparse24Weight | None, dict]:
    """Take one layer's weight over, or say why it stays dense. Returns (the sparse weight or None, a record).

    threshold_for_shape(rows, cols, dtype, backend, device) -> int | None: measured on the GPU by
    default; tests pass a fake timing table.
    """
    record = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."), "2:4": False, "path": "dense"}
    reason = not_2_of_4_reason(weight)
    if reason is not None:
        return None, record | {"reason": reason}
    record["2:4"] = True
    reason = runtime_unavailable_reason(weight.device)
    if reason is not None:
        return None, record | {"reason": f"2:4 kernels unavailable: {reason}"}
    reasons = []
    for backend in BACKENDS:
        if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
            reasons.append("cusparselt: not in this PyTorch build")
            continue
        reason = unsupported_reason(weight, backend)
        if reason is None:
            threshold = threshold_for_shape(*weight.shape, weight.dtype, backend, str(weight.device))
            if threshold is not None:
                sparse = Sparse24Weight(weight, backend, threshold)
                return sparse, record | {"path": "sparse", "backend": backend, "threshold_tokens": threshold,
                                         "extra_bytes": sparse.extra_bytes}
            reason = "never faster than dense at the timed token counts"
        reasons.append(f"{backend}: {reason}")
    return None, record | {"reason": "; ".join(reasons)}


def summarize_plan(records: list[dict]) -> dict:
    """What the runtime did with a model's linear layers, from plan_layer's records (one per layer and worker)."""
    sparse = [r for r in records if r["path"] == "sparse"]
    reasons: dict[str, int] = {}
    for record in records:
        if record["path"] == "dense":
            reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
    return {"layers": len(records), "2:4": sum(r["2:4"] for r in records), "sparse": len(sparse),
            "extra_bytes": sum(r["extra_bytes"] for r in sparse), "dense_reasons": reasons}


def describe_plan(summary: dict) -> str:
    """One line for people: how many layers run sparse, at what memory, and why the others do not."""
    line = (f"{summary['sparse']} of {summary['layers']} linear layers on the 2:4 kernels ({summary['2:4']} are 2:4), "
            f"extra memory {summary['extra_bytes'] / 2**20:+.1f} MiB")
    if summary["dense_reasons"]:
        line += "; dense: " + "; ".join(f"{count} × {reason}" for reason, count in summary["dense_reasons"].items())
    return line


class Sparse24Linear(nn.Module):
    """An nn.Linear on a Sparse24Weight: the plugin's path as a module, for models outside vLLM (bench/gpu_sparse.py)."""

    def __init__(self, weight24: Sparse24Weight, bias: torch.Tensor | None):
        super().__init__()
        self.weight24, self.bias = weight24, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight24.linear(x, self.bias)
