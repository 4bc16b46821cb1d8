"""2:4 linear layers on PyTorch's semi-structured sparse kernels, with a dense path for small batches.

vLLM and torchao dropped their 2:4 kernels in 2026; PyTorch core keeps
`torch.sparse.to_sparse_semi_structured` (CUTLASS and cuSPARSELt). A weight is taken over only when
it is exactly 2:4 along the input dimension, in a dtype the kernels run 2:4 (not float32), on a
device where PyTorch runs a backend, with a shape that fits its tiles; when that backend, packed
and multiplied inside a `try`, gives the dense layer's outputs on probe inputs (also replayed from a
CUDA graph when the server captures graphs); and when it beats dense from some measured token count
up. Otherwise the layer stays dense and `plan_layer` says why: a failing backend never fails a load.

Sparse GEMMs lose to dense ones at small token counts (decode), so below the threshold the dense
weight is kept and used. The choice is made per call inside the custom op `wanda24::linear`:
torch.compile cannot see into it, so it cannot freeze the branch it traced, and each batch size
captured in a CUDA graph records its own path. A call being captured uses a threshold of its own, timed
from CUDA-graph replays: PyTorch sets cuSPARSELt up again on every eager call (about 0.5 ms on an
H200, docs/gpu_sparse.md), which a replay skips, so the kernels can win in a graph where they lose
eagerly. This module needs torch only: the vLLM plugin
(deploy/vllm_plugin.py) and bench/gpu_sparse.py both run on it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
# PyTorch's own CUTLASS packing, written in plain torch ops: it runs on a CPU, where the kernels do not.
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

PLUGIN_NAME = "wanda24"  # the vLLM plugin's entry point and --quantization name (deploy/vllm_plugin.py)
PLAN_REPORT_ENV = "WANDA_SERVE_SPARSE_REPORT"  # where the plugin appends each layer's record, when set
GPU_BACKENDS = ("cusparselt", "cutlass")  # order of preference when both pass
THRESHOLD_TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # token counts timed at load time
THRESHOLD_REPEATS = 10
NEVER = torch.iinfo(torch.int64).max  # a threshold no call reaches: sparse never wins there
PROBE_TOKENS = (1, 37, 256)  # 1 and 37 are padded to the kernels' tiles, 256 is not
PROBE_TOLERANCE_EPS = 8  # the probe's tolerance, in machine epsilons of the weight's dtype (see relative_error)
EXECUTION_NOTES = {  # what each of vLLM's execution modes does to the per-call choice (describe_plan)
    "torch.compile": f"dense or sparse is chosen per call inside the op {PLUGIN_NAME}::linear, which torch.compile does not trace into",
    "CUDA graphs": "each captured batch size records its own path, by the threshold timed from CUDA-graph replays; the replay "
                   "from a CUDA graph was checked against dense at load",
}
DENSE_DTYPES = {  # dtypes the kernels do not run 2:4
    torch.float32: "float32 is 1:2, not 2:4, on these kernels (CUTLASS pairs float32 values; cuSPARSELt has no float32)",
}


def runtime_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """Why `device` is not a CUDA device the 2:4 kernels could run on, or None when it is."""
    device = torch.device(device)
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    if device.type != "cuda":
        return f"the weight is on {device}, not on a CUDA device"
    return None


def _cutlass_unavailable(device: torch.device) -> str | None:
    reason = runtime_unavailable_reason(device)
    if reason is not None:
        return reason
    major, minor = torch.cuda.get_device_capability(device)
    if major != 8:  # PyTorch's CUTLASS 2:4 op checks this (pytorch issue 132928: it fails on an H100)
        return f"PyTorch runs CUTLASS 2:4 on compute capability 8.x only; this GPU is {major}.{minor}"
    return None


def _cusparselt_unavailable(device: torch.device) -> str | None:
    reason = runtime_unavailable_reason(device)
    if reason is not None:
        return reason
    if not torch.backends.cusparselt.is_available():
        return "cuSPARSELt is not in this PyTorch build"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"cuSPARSELt 2:4 needs compute capability 8.0 or newer; this GPU is {major}.{minor}"
    return None


def _semi_structured(cls) -> tuple[Callable, Callable]:
    """Packing and multiplying with PyTorch's tensor subclass `cls`: its own checks, layout and dispatch."""
    def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensor = cls.from_dense(weight)
        return tensor.packed, tensor.meta

    def mm(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor | None, out_features: int) -> torch.Tensor:
        # Rebuilt from the packed tensors on each call: a custom op takes plain tensors, and the wrapper is only metadata.
        # fuse_transpose_cusparselt: torch 2.11's cuSPARSELt path then has the kernel write the product in the row-major
        # layout F.linear returns, instead of transposed in memory (read in its source, not yet run on a GPU); torch
        # 2.13 does that by itself and ignores the flag, CUTLASS never reads it.
        weight = cls(torch.Size((out_features, x.shape[1])), packed, meta, None, None, None, fuse_transpose_cusparselt=True)
        return F.linear(x, weight)

    return pack, mm


def _standin_mm(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return F.linear(x, sparse_semi_structured_to_dense_cutlass(packed, meta))


@dataclass(frozen=True)
class Backend:
    """One way to run a 2:4 weight: where it runs, the tiles it takes, how it packs a weight and multiplies from the packing."""

    unavailable: Callable[[torch.device], str | None]  # why it cannot run on a device, None when it can
    tiles: dict  # dtype -> PyTorch's per-dtype shape constraints (sparse_min_rows, sparse_min_cols, ...)
    pack: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # weight (out, in) -> (packed, meta)
    mm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]  # x (tokens, in) -> (tokens, out)


BACKENDS = {
    "cusparselt": Backend(_cusparselt_unavailable, SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS,
                          *_semi_structured(SparseSemiStructuredTensorCUSPARSELT)),
    "cutlass": Backend(_cutlass_unavailable, SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS,
                       *_semi_structured(SparseSemiStructuredTensorCUTLASS)),
    # For CPUs (tests, the GPU benchmark's dry run): the CUTLASS layout itself, kept values plus their 2-bit
    # positions, packed by PyTorch's code and unpacked on every call, so that a wrong position gives wrong outputs.
    "standin": Backend(lambda device: None, SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS,
                       sparse_semi_structured_from_dense_cutlass, _standin_mm),
}


@dataclass(frozen=True)
class Execution:
    """How the server runs the model's forward pass (vLLM decides it before loading); the probe follows it."""

    compiled: bool = False
    cuda_graphs: bool = False

    def __str__(self) -> str:
        modes = [name for name, used in (("torch.compile", self.compiled), ("CUDA graphs", self.cuda_graphs)) if used]
        return " + ".join(modes) or "eager"


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
    """Why `weight` (out, in), 2:4, does not fit the tiles of `backend` in its dtype, or None when it does."""
    rows, cols = weight.shape
    constraints = BACKENDS[backend].tiles.get(weight.dtype)
    if constraints is None:
        return f"{weight.dtype} is not supported by the {backend} backend"
    min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}x{cols} is not a multiple of {min_rows}x{min_cols} ({backend}, {weight.dtype})"
    return None


def backend_reason(weight: torch.Tensor, backend: str) -> str | None:
    """Why the plugin will not even probe `backend` for `weight` (2:4): device, dtype or tiles. None: it will."""
    return BACKENDS[backend].unavailable(weight.device) or DENSE_DTYPES.get(weight.dtype) or unsupported_reason(weight, backend)


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


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out - reference| / (|reference| + mean |reference|), elementwise.

    Two roundings of the same product differ by about one epsilon of |reference|; the mean term keeps
    outputs near zero (cancellations) from counting as large errors. NaN when out holds a NaN.
    """
    out, reference = out.float(), reference.float()
    scale = reference.abs() + reference.abs().mean() + torch.finfo(torch.float32).tiny
    return float(((out - reference).abs() / scale).max())


def tolerance(dtype: torch.dtype) -> float:
    return PROBE_TOLERANCE_EPS * torch.finfo(dtype).eps


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


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn() captured in a CUDA graph, and the output tensor its replays write (in the graph's memory pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture: library handles, workspaces and plans are made here
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def run_in_cuda_graph(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() captured in a CUDA graph and replayed once: what a server's CUDA graph of it computes."""
    graph, out = capture_cuda_graph(fn)
    graph.replay()
    return out.clone()


def replay_ms(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn()'s GPU work alone, replayed from a CUDA graph (no host work)."""
    graph, _ = capture_cuda_graph(fn)
    return median_ms(graph.replay, repeats, device)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op(f"{PLUGIN_NAME}::linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, dense: torch.Tensor | None, packed: torch.Tensor, meta: torch.Tensor | None,
                    bias: torch.Tensor | None, backend: str, out_features: int, threshold: int, graph_threshold: int) -> torch.Tensor:
    """x (tokens, in) times the layer's weight: when `dense` is kept, dense below `threshold` tokens (`graph_threshold`
    while a CUDA graph is being captured), else on `backend`."""
    if dense is not None and x.shape[0] < (graph_threshold if _capturing(x) else threshold):
        return F.linear(x, dense, bias)
    # The op's registered (fake) output is contiguous, and torch.compile's generated code asserts the strides it was
    # promised. Under torch 2.11 cuSPARSELt's product came back transposed in memory (an H200, docs/gpu_sparse.md), and
    # this copy then costs a transpose: about 0.7 ms at 8192 x 14336 (docs/gpu_capture_check.log), which load-time
    # timing includes. Where the kernel writes row-major itself (see fuse_transpose_cusparselt above) it is free.
    out = BACKENDS[backend].mm(x, packed, meta, out_features).contiguous()
    return out if bias is None else out + bias  # bias outside the kernels: the probe checks exactly what runs


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, dense, packed, meta, bias, backend, out_features, threshold, graph_threshold):
    return x.new_empty(x.shape[0], out_features)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass(frozen=True, eq=False)
class Sparse24Weight:
    """A 2:4 weight packed for one backend; with `dense` kept, calls below `threshold` tokens (`graph_threshold` for
    calls captured in a CUDA graph) use it instead."""

    backend: str
    packed: torch.Tensor
    meta: torch.Tensor | None
    out_features: int
    dense_bytes: int
    dense: torch.Tensor | None = None  # None: sparse at every token count
    threshold: int = THRESHOLD_TOKENS[0]
    graph_threshold: int = THRESHOLD_TOKENS[0]

    @classmethod
    def pack(cls, weight: torch.Tensor, backend: str) -> Sparse24Weight:
        packed, meta = BACKENDS[backend].pack(weight.contiguous())
        return cls(backend, packed, meta, weight.shape[0], _nbytes(weight))

    def with_thresholds(self, weight: torch.Tensor, eager: int | None, graph: int | None) -> Sparse24Weight:
        """Sparse from `eager` tokens per call, from `graph` in calls captured in a CUDA graph; None: never."""
        threshold, graph_threshold = (NEVER if tokens is None else tokens for tokens in (eager, graph))
        # Where sparse always wins from the first timed count up, the dense copy is not needed.
        needs_dense = max(threshold, graph_threshold) > THRESHOLD_TOKENS[0]
        return dataclasses.replace(self, threshold=threshold, graph_threshold=graph_threshold, dense=weight if needs_dense else None)

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the dense layer (negative: a saving)."""
        packed = _nbytes(self.packed) + _nbytes(self.meta)
        return packed if self.dense is not None else packed - self.dense_bytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # the kernels take 2-D inputs
        out = sparse24_linear(flat, self.dense, self.packed, self.meta, bias, self.backend, self.out_features, self.threshold,
                              self.graph_threshold)
        return out.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def measure_timings(weight: torch.Tensor, sparse_linear: Callable[[torch.Tensor], torch.Tensor], tokens_list=THRESHOLD_TOKENS,
                    repeats: int = THRESHOLD_REPEATS, graphs: bool = False) -> dict[int, tuple[float, float]]:
    """tokens -> (dense ms, sparse ms) of one GEMM with this weight, on its device: called eagerly, or with `graphs`
    replayed from CUDA graphs."""
    time_ms = replay_ms if graphs else median_ms
    timings = {}
    for tokens in tokens_list:
        x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
        timings[tokens] = (time_ms(lambda: F.linear(x, weight), repeats, weight.device),
                           time_ms(lambda: sparse_linear(x), repeats, weight.device))
    return timings


@lru_cache(maxsize=None)
def _threshold_for_shape(rows: int, cols: int, dtype: torch.dtype, backend: str, device: str, graphs: bool) -> int | None:
    """Measured once per shape (eagerly, or replayed from CUDA graphs): every layer of that shape shares the GEMM and so
    the threshold."""
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    weight.view(rows, cols // 4, 4)[..., 2:] = 0
    return threshold_from_timings(measure_timings(weight, Sparse24Weight.pack(weight, backend).linear, graphs=graphs))


@torch.no_grad()
def probe_reason(weight24: Sparse24Weight, weight: torch.Tensor, cuda_graphs: bool) -> str | None:
    """Why weight24's sparse path does not give weight's outputs on probe inputs, within `tolerance`, or None.

    Eagerly, and replayed from a CUDA graph when the server will capture graphs. Errors propagate to the caller.
    """
    limit = tolerance(weight.dtype)
    generator = torch.Generator(weight.device).manual_seed(0)
    for tokens in PROBE_TOKENS:
        x = torch.randn(tokens, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
        reference = F.linear(x, weight)
        runs = [("", weight24.linear(x))]
        if cuda_graphs:
            runs.append((" replayed from a CUDA graph", run_in_cuda_graph(lambda: weight24.linear(x))))
        for how, out in runs:
            error = relative_error(out, reference)
            if not error <= limit:  # NaN fails too
                return f"output{how} at {tokens} tokens differs from dense: relative error {error:.3g} > {limit:.3g}"
    return None


def _take_over(weight: torch.Tensor, backend: str, threshold_for_shape, execution: Execution) -> tuple[Sparse24Weight | None, str | None]:
    weight24 = Sparse24Weight.pack(weight, backend)  # dense=None: the probe sees the sparse path at every count
    reason = probe_reason(weight24, weight, execution.cuda_graphs)
    if reason is not None:
        return None, reason
    timed = partial(threshold_for_shape, *weight.shape, weight.dtype, backend, str(weight.device))
    eager = timed(False)
    graph = timed(True) if execution.cuda_graphs else eager  # graphs: the threshold for calls replayed from a graph
    if eager is None and graph is None:
        return None, "never faster than dense at the timed token counts" + (", eagerly or in CUDA graphs" if execution.cuda_graphs else "")
    return weight24.with_thresholds(weight, eager, graph), None


def plan_layer(weight: torch.Tensor, threshold_for_shape=_threshold_for_shape, backends=GPU_BACKENDS,
               execution: Execution = Execution()) -> tuple[Sparse24Weight | None, dict]:
    """Take one layer's weight over, or say why it stays dense. Returns (the sparse weight or None, a record).

    Never raises for a backend's sake: anything a backend throws keeps the layer dense with the error as the reason.
    threshold_for_shape(rows, cols, dtype, backend, device, graphs) -> int | None: measured on the device by default,
    eagerly and (where the server captures CUDA graphs) replayed from graphs; tests pass a fake timing table.
    backends: names in BACKENDS, in order of preference.
    """
    record = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."), "2:4": False, "path": "dense"}
    reason = not_2_of_4_reason(weight)
    if reason is not None:
        return None, record | {"reason": reason}
    record["2:4"] = True
    unavailable = {backend: BACKENDS[backend].unavailable(weight.device) for backend in backends}
    if all(unavailable.values()):
        return None, record | {"reason": "2:4 kernels unavailable: " + "; ".join(dict.fromkeys(unavailable.values()))}
    if weight.dtype in DENSE_DTYPES:
        return None, record | {"reason": DENSE_DTYPES[weight.dtype]}
    reasons = []
    for backend in backends:
        reason = backend_reason(weight, backend)
        if reason is None:
            try:
                weight24, reason = _take_over(weight, backend, threshold_for_shape, execution)
            except Exception as e:  # noqa: BLE001 - whatever a kernel raises, the layer stays dense and the load goes on
                weight24, reason = None, f"failed: {type(e).__name__}: {e}"
            if weight24 is not None:
                graph = {"graph_threshold_tokens": _tokens(weight24.graph_threshold)} if execution.cuda_graphs else {}
                return weight24, record | {"path": "sparse", "backend": backend, "threshold_tokens": _tokens(weight24.threshold),
                                           **graph, "extra_bytes": weight24.extra_bytes, "execution": str(execution)}
        reasons.append(f"{backend}: {reason}")
    return None, record | {"reason": "; ".join(reasons)}


def _tokens(threshold: int) -> int | None:
    return None if threshold == NEVER else threshold


def thresholds_text(record: dict) -> str:
    """Where a sparse layer's record says it goes sparse, for the server log."""
    def text(tokens: int | None) -> str:
        return "never" if tokens is None else f"from {tokens} tokens"
    eager, graph = record["threshold_tokens"], record.get("graph_threshold_tokens", record["threshold_tokens"])
    return f"{text(eager)} per call" if graph == eager else f"{text(eager)} per eager call, {text(graph)} in CUDA graphs"


def summarize_plan(records: list[dict]) -> dict:
    """What the runtime did with a model's linear layers, from plan_layer's records (one per layer and worker)."""
    sparse = [r for r in records if r["path"] == "sparse"]
    reasons: dict[str, int] = {}
    for record in records:
        if record["path"] == "dense":
            reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
    return {"layers": len(records), "2:4": sum(r["2:4"] for r in records), "sparse": len(sparse),
            "extra_bytes": sum(r["extra_bytes"] for r in sparse), "dense_reasons": reasons,
            "execution": sorted({r["execution"] for r in sparse})}


def describe_plan(summary: dict) -> str:
    """One line for people: how many layers run sparse and how (eager, compiled, CUDA graphs), at what memory, and why the others do not."""
    line = (f"{summary['sparse']} of {summary['layers']} linear layers on the 2:4 kernels ({summary['2:4']} are 2:4), "
            f"extra memory {summary['extra_bytes'] / 2**20:+.1f} MiB")
    if summary["sparse"]:
        modes = summary["execution"]
        notes = [note for mode, note in EXECUTION_NOTES.items() if any(mode in m for m in modes)]
        line += f"; they run {' / '.join(modes)}" + (f" ({'; '.join(notes)})" if notes else "")
        line += "; not yet run inside vLLM on a GPU (docs/gpu_sparse.md)"
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
