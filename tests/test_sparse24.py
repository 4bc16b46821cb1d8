"""The 2:4 runtime's checks, probe and fall-backs, on the CPU (the kernels themselves need a GPU: bench/gpu_sparse.py).

Where a kernel would run, these tests use the "standin" backend: the CUTLASS layout (kept values and their 2-bit
positions), packed by PyTorch's own code and unpacked on every call.
"""

import dataclasses
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy import sparse24
from deploy.sparse24 import (
    BACKENDS, Backend, Execution, Sparse24Weight, describe_plan, not_2_of_4_reason, plan_layer, probe_reason, runtime_unavailable_reason,
    summarize_plan, threshold_from_timings, thresholds_text, unsupported_reason,
)
from wanda_serve.structure import Structure, prune_mask

ROOT = Path(__file__).parents[1]
STANDIN = BACKENDS["standin"]


def pruned_2_of_4(rows: int, cols: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return weight.masked_fill(prune_mask(weight.abs(), Structure(n=2, m=4)), 0).to(dtype)


def with_a_wrong_index(packed: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    meta = meta.clone()
    meta.view(-1)[0] ^= 0b01  # one kept value's 2-bit position now points at its neighbour in the group of 4
    return packed, meta


def test_2_of_4_check_says_why_not():
    assert not_2_of_4_reason(pruned_2_of_4(64, 128)) is None
    assert "not 2:4 along the input dimension" in not_2_of_4_reason(torch.randn(64, 128, dtype=torch.bfloat16))
    one_group_short = pruned_2_of_4(64, 128)
    one_group_short[5, 8:12] = 1.0
    assert not_2_of_4_reason(one_group_short) == "not 2:4 along the input dimension (1 groups of 4 inputs hold fewer than 2 zeros)"
    assert not_2_of_4_reason(torch.zeros(64, 126)) == "126 inputs are not a multiple of 4"


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_tiles_and_dtypes_follow_pytorchs_tables(backend):
    assert unsupported_reason(pruned_2_of_4(64, 128), backend) is None
    assert "is not a multiple of" in unsupported_reason(pruned_2_of_4(40, 128), backend)
    assert "float64 is not supported" in unsupported_reason(pruned_2_of_4(64, 128, torch.float64), backend)


def test_cutlass_and_cusparselt_tiles_differ():
    # 48 rows: a multiple of cuSPARSELt's 16-row tile, not of CUTLASS's 32 (bf16)
    weight = pruned_2_of_4(48, 128)
    assert unsupported_reason(weight, "cusparselt") is None
    assert "32x64" in unsupported_reason(weight, "cutlass")


def test_merged_projections_keep_their_2_of_4_validity():
    q, k, v = pruned_2_of_4(64, 128, seed=1), pruned_2_of_4(32, 128, seed=2), pruned_2_of_4(32, 128, seed=3)
    assert not_2_of_4_reason(torch.cat([q, k, v])) is None  # vLLM's qkv_proj stacks rows
    gate, up = pruned_2_of_4(96, 128, seed=4), torch.randn(96, 128, dtype=torch.bfloat16)
    assert "not 2:4" in not_2_of_4_reason(torch.cat([gate, up]))  # one dense part spoils the merge


def test_threshold_is_where_sparse_wins_for_good():
    # tokens -> (dense ms, sparse ms), as the GPU benchmark measures them
    assert threshold_from_timings({1: (0.05, 0.09), 16: (0.06, 0.08), 128: (0.20, 0.18), 1024: (1.4, 1.0)}) == 128
    # a win at 16 that is lost again at 128 does not count: sparse must win from the threshold up
    assert threshold_from_timings({16: (0.08, 0.07), 128: (0.2, 0.3), 1024: (1.4, 1.0)}) == 1024
    assert threshold_from_timings({1: (0.05, 0.09), 8192: (11.0, 12.0)}) is None


def test_a_cpu_plan_keeps_every_layer_dense_and_says_why():
    kept, record = plan_layer(torch.randn(64, 128, dtype=torch.bfloat16))
    assert kept is None and record["2:4"] is False and record["reason"].startswith("not 2:4 along the input dimension")
    kept, record = plan_layer(pruned_2_of_4(64, 128))
    assert kept is None and record["2:4"] is True and record["path"] == "dense"
    if not torch.cuda.is_available():  # one reason, not one per backend: vllm_server and the e2e test read it
        assert record["reason"] == f"2:4 kernels unavailable: no CUDA device (torch {torch.__version__})"


def test_this_machine_says_why_it_falls_back():
    reason = runtime_unavailable_reason()
    assert reason is None or "CUDA" in reason
    if not torch.cuda.is_available():
        assert reason.startswith("no CUDA device")


def test_the_standin_stores_half_the_values_and_their_positions():
    weight = pruned_2_of_4(64, 128)
    packed, meta = STANDIN.pack(weight)
    assert packed.shape == (64, 64) and meta.dtype == torch.int16 and meta.numel() * 16 == 64 * 64 * 2  # 2 bits per kept value
    assert torch.equal(sparse24.sparse_semi_structured_to_dense_cutlass(packed, meta), weight)
    assert not torch.equal(sparse24.sparse_semi_structured_to_dense_cutlass(*with_a_wrong_index(packed, meta)), weight)


def test_a_wrong_index_fails_the_probe():
    weight = pruned_2_of_4(64, 128)
    right = Sparse24Weight.pack(weight, "standin")
    assert probe_reason(right, weight, cuda_graphs=False) is None
    wrong = dataclasses.replace(right, **dict(zip(("packed", "meta"), with_a_wrong_index(right.packed, right.meta))))
    reason = probe_reason(wrong, weight, cuda_graphs=False)
    assert re.fullmatch(r"output at \d+ tokens differs from dense: relative error [0-9.e-]+ > 0.0625", reason)


def test_plan_takes_a_layer_over_when_the_probe_passes_and_sparse_wins():
    timings = {1: (0.05, 0.09), 16: (0.06, 0.08), 128: (0.20, 0.18), 1024: (1.4, 1.0)}  # a fake timing table
    weight = pruned_2_of_4(64, 128)
    sparse, record = plan_layer(weight, lambda *shape_dtype_backend_device: threshold_from_timings(timings), ("standin",),
                                Execution(compiled=True))
    compressed = 64 * 64 * 2 + 64 * 8 * 2  # kept values and their positions
    assert record == {"shape": [64, 128], "dtype": "bfloat16", "2:4": True, "path": "sparse", "backend": "standin",
                      "threshold_tokens": 128, "extra_bytes": compressed, "execution": "torch.compile"}  # the dense copy stays
    always, record = plan_layer(weight, lambda *args: 1, ("standin",))  # sparse wins from one token: no dense copy
    assert always.dense is None and record["extra_bytes"] == compressed - 64 * 128 * 2


def test_where_the_server_captures_graphs_a_layer_that_wins_only_in_graphs_goes_sparse_only_there(monkeypatch):
    monkeypatch.setattr(sparse24, "run_in_cuda_graph", lambda fn: fn())  # the probe's replay, without a GPU
    graphs_only = lambda rows, cols, dtype, backend, device, graphs: 256 if graphs else None  # noqa: E731 - eager never wins
    weight = pruned_2_of_4(64, 128)
    sparse, record = plan_layer(weight, graphs_only, ("standin",), Execution(cuda_graphs=True))
    assert (record["threshold_tokens"], record["graph_threshold_tokens"]) == (None, 256)
    assert (sparse.threshold, sparse.graph_threshold) == (sparse24.NEVER, 256) and sparse.dense is weight
    assert thresholds_text(record) == "never per eager call, from 256 tokens in CUDA graphs"
    kept, record = plan_layer(weight, lambda *args: None, ("standin",), Execution(cuda_graphs=True))
    assert kept is None and record["reason"] == "standin: never faster than dense at the timed token counts, eagerly or in CUDA graphs"
    # without graphs the graph timing is neither taken nor reported
    kept, record = plan_layer(weight, graphs_only, ("standin",), Execution(compiled=True))
    assert kept is None and "graph_threshold_tokens" not in record


def test_the_op_takes_the_graph_threshold_only_while_a_graph_is_captured(monkeypatch):
    monkeypatch.setitem(BACKENDS, "marked", standin_with(mm=lambda *args: STANDIN.mm(*args) + 1))  # tells the paths apart
    weight = pruned_2_of_4(64, 128)
    sparse = Sparse24Weight.pack(weight, "marked").with_thresholds(weight, None, 16)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    dense = torch.nn.functional.linear(x, weight)
    assert torch.equal(sparse.linear(x), dense)  # eagerly: never sparse
    monkeypatch.setattr(sparse24, "_capturing", lambda x: True)
    assert torch.equal(sparse.linear(x), dense + 1)  # captured at 32 tokens: sparse
    assert torch.equal(sparse.linear(x[:8]), dense[:8])  # captured below 16 tokens: dense
    assert thresholds_text({"threshold_tokens": 128}) == "from 128 tokens per call"


def test_plan_keeps_layers_dense_where_sparse_never_wins_or_cannot_fit():
    kept, record = plan_layer(pruned_2_of_4(64, 128), lambda *args: None, ("standin",))
    assert kept is None and record["reason"] == "standin: never faster than dense at the timed token counts"
    kept, record = plan_layer(pruned_2_of_4(40, 128), lambda *args: 1, ("standin",))
    assert kept is None and record["reason"] == "standin: shape 40x128 is not a multiple of 32x64 (standin, torch.bfloat16)"
    summary = summarize_plan([record, {**record, "layer": "b"}])
    assert (summary["layers"], summary["2:4"], summary["sparse"], summary["execution"]) == (2, 2, 0, [])
    assert describe_plan(summary) == ("0 of 2 linear layers on the 2:4 kernels (2 are 2:4), extra memory +0.0 MiB; "
                                      f"dense: 2 × {record['reason']}")


def test_float32_stays_dense_and_the_probe_would_catch_it_too(monkeypatch):
    weight = pruned_2_of_4(64, 128, torch.float32)
    kept, record = plan_layer(weight, lambda *args: 1, ("standin",))
    assert kept is None and record["reason"].startswith("float32 is 1:2, not 2:4, on these kernels")
    # Without the rule, the CUTLASS layout (it pairs float32 values) gives wrong outputs, and the probe says so.
    monkeypatch.setattr(sparse24, "DENSE_DTYPES", {})
    kept, record = plan_layer(weight, lambda *args: 1, ("standin",))
    assert kept is None and record["reason"].startswith("standin: output at 1 tokens differs from dense")


def standin_with(pack=STANDIN.pack, mm=STANDIN.mm) -> Backend:
    return dataclasses.replace(STANDIN, pack=pack, mm=mm)


def raises(*args):
    raise RuntimeError("CUTLASS 2:4 is not supported on this GPU")


BROKEN_BACKENDS = {  # name -> (backend, how the plan's reason for it starts)
    "pack_raises": (standin_with(pack=raises), "pack_raises: failed: RuntimeError: CUTLASS 2:4 is not supported on this GPU"),
    "mm_raises": (standin_with(mm=raises), "mm_raises: failed: RuntimeError: CUTLASS 2:4 is not supported on this GPU"),
    "mm_is_off": (standin_with(mm=lambda *args: STANDIN.mm(*args) * 1.1), "mm_is_off: output at 1 tokens differs from dense"),
    "mm_gives_nan": (standin_with(mm=lambda *args: STANDIN.mm(*args) * torch.nan), "mm_gives_nan: output at 1 tokens differs"),
    "wrong_index": (standin_with(pack=lambda weight: with_a_wrong_index(*STANDIN.pack(weight))),
                    "wrong_index: output at "),
}


@pytest.mark.parametrize("name", BROKEN_BACKENDS)
def test_a_failing_or_wrong_backend_leaves_the_layer_dense_with_its_error(monkeypatch, name):
    backend, reason = BROKEN_BACKENDS[name]
    monkeypatch.setitem(BACKENDS, name, backend)
    kept, record = plan_layer(pruned_2_of_4(64, 128), lambda *args: 1, (name,))
    assert kept is None and record["path"] == "dense" and record["reason"].startswith(reason)
    # the next backend in order of preference still gets its chance
    sparse, record = plan_layer(pruned_2_of_4(64, 128), lambda *args: 1, (name, "standin"))
    assert sparse is not None and record["backend"] == "standin"


def test_timing_that_raises_leaves_the_layer_dense():
    kept, record = plan_layer(pruned_2_of_4(64, 128), raises, ("standin",))
    assert kept is None and record["reason"] == "standin: failed: RuntimeError: CUTLASS 2:4 is not supported on this GPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the capture itself runs")
def test_a_failing_cuda_graph_capture_leaves_the_layer_dense():
    # Where vLLM will capture CUDA graphs the probe replays each layer from one; here capturing fails (no CUDA).
    kept, record = plan_layer(pruned_2_of_4(64, 128), lambda *args: 1, ("standin",), Execution(compiled=True, cuda_graphs=True))
    assert kept is None and record["reason"].startswith("standin: failed: ")


def test_describe_plan_says_how_the_sparse_layers_run():
    compiled = plan_layer(pruned_2_of_4(64, 128), lambda *args: 128, ("standin",), Execution(compiled=True))[1]
    dense = plan_layer(torch.randn(64, 128, dtype=torch.bfloat16))[1]
    assert describe_plan(summarize_plan([compiled, dense])) == (
        "1 of 2 linear layers on the 2:4 kernels (1 are 2:4), extra memory +0.0 MiB; they run torch.compile (dense or sparse "
        "is chosen per call inside the op wanda24::linear, which torch.compile does not trace into); not yet run inside vLLM "
        f"on a GPU (docs/gpu_sparse.md); dense: 1 × {dense['reason']}")
    # Capturing needs a GPU: the record says what a GPU server's plan would
    graphs = {**compiled, "execution": str(Execution(compiled=True, cuda_graphs=True))}
    assert ("; they run torch.compile + CUDA graphs (dense or sparse is chosen per call inside the op wanda24::linear, which "
            "torch.compile does not trace into; each captured batch size records its own path, by the threshold timed from "
            "CUDA-graph replays; the replay from a CUDA graph was checked against dense at load); ") in describe_plan(summarize_plan([graphs]))
    eager = {**compiled, "execution": str(Execution())}
    assert "; they run eager; not yet run inside vLLM on a GPU" in describe_plan(summarize_plan([eager]))


def test_gpu_benchmark_dry_run_runs_the_swap_and_checks_it(tmp_path):
    out = tmp_path / "gpu_sparse.md"
    run = subprocess.run([sys.executable, "bench/gpu_sparse.py", "--dry-run", "--repeats", "2", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    timed = [row for row in result["gemm"] if "tokens" in row]
    assert len(timed) == 3 * 2 * 3  # 3 dtypes, 2 shapes, 3 token counts, one backend
    used = [row for row in timed if row["plugin_skips"] is None]
    assert {row["dtype"] for row in used} == {"bfloat16", "float16"} and all(row["relative_error"] == 0.0 for row in used)
    assert not any(row["within_tolerance"] for row in timed if row["dtype"] == "float32")  # the layout pairs float32 values
    assert set(result["thresholds"]) == {f"{shape} {dtype} standin" for shape in ("64x128", "128x64") for dtype in ("bfloat16", "float16")}
    e2e = result["end_to_end"]
    assert e2e["swap"]["swapped"] == 2 * 7 and not e2e["swap"]["kept_dense"]  # every projection of both blocks
    assert [(row["mode"], row["tokens"]) for row in e2e["modes"] if "relative_error" in row] == [
        ("eager", 1), ("eager", 32), ("torch.compile", 1), ("torch.compile", 32)]
    assert "| bfloat16 | tiny | a | 64x128 | standin |  | 1 |" in out.read_text()


def test_gpu_benchmark_dry_run_fails_on_a_wrong_index(monkeypatch):
    gpu_sparse = runpy.run_path(str(ROOT / "bench" / "gpu_sparse.py"))  # a script, not a package
    name, (backend, _) = "wrong_index", BROKEN_BACKENDS["wrong_index"]
    monkeypatch.setitem(BACKENDS, name, backend)
    result = gpu_sparse["measure"](dataclasses.replace(gpu_sparse["DRY"], backends=(name,)), torch.bfloat16, repeats=1)
    failures = gpu_sparse["dry_run_failures"](result)
    assert any(failure.startswith("GEMM row differs from dense or failed") for failure in failures)
    assert any(failure.startswith("layers kept dense: {'0.self_attn.q_proj': 'wrong_index: output at ")
               for failure in failures)


def test_the_op_returns_the_strides_its_fake_promises_from_a_column_major_kernel(monkeypatch):
    """cuSPARSELt returns its product transposed in memory. torch.compile's generated code asserts the strides the op's
    fake promised, so on an H200 a compiled prefill through the op failed (docs/gpu_sparse.md) until it returned a
    contiguous result. opcheck compares the real output with the fake one, strides included."""
    monkeypatch.setitem(BACKENDS, "column_major", standin_with(mm=lambda *args: STANDIN.mm(*args).t().contiguous().t()))
    weight24 = Sparse24Weight.pack(pruned_2_of_4(64, 128), "column_major")
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    torch.library.opcheck(sparse24.sparse24_linear, (x, None, weight24.packed, weight24.meta, None, "column_major", 64, 1, 1))
