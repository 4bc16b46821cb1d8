"""The 2:4 runtime's checks and dispatch, on the CPU (the kernels themselves need a GPU: bench/gpu_sparse.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deploy import sparse24
from deploy.sparse24 import (
    describe_plan, plan_layer, runtime_unavailable_reason, summarize_plan, threshold_from_timings, unsupported_reason, use_sparse,
)
from wanda_serve.structure import Structure, prune_mask


def pruned_2_of_4(rows: int, cols: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return weight.masked_fill(prune_mask(weight.abs(), Structure(n=2, m=4)), 0).to(dtype)


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_2_of_4_check_accepts_fitting_weights_and_says_why_not(backend):
    assert unsupported_reason(pruned_2_of_4(64, 128), backend) is None
    dense = torch.randn(64, 128, dtype=torch.bfloat16)
    assert "not 2:4 along the input dimension" in unsupported_reason(dense, backend)
    one_group_short = pruned_2_of_4(64, 128)
    one_group_short[5, 8:12] = 1.0
    assert "not 2:4" in unsupported_reason(one_group_short, backend)
    assert "is not a multiple of" in unsupported_reason(pruned_2_of_4(40, 128), backend)
    assert "float64 is not supported" in unsupported_reason(pruned_2_of_4(64, 128, torch.float64), backend)


def test_cutlass_and_cusparselt_tiles_differ():
    # 48 rows: a multiple of cuSPARSELt's 16-row tile, not of CUTLASS's 32 (bf16)
    weight = pruned_2_of_4(48, 128)
    assert unsupported_reason(weight, "cusparselt") is None
    assert "32x64" in unsupported_reason(weight, "cutlass")


def test_merged_projections_keep_their_2_of_4_validity():
    q, k, v = pruned_2_of_4(64, 128, seed=1), pruned_2_of_4(32, 128, seed=2), pruned_2_of_4(32, 128, seed=3)
    assert unsupported_reason(torch.cat([q, k, v]), "cutlass") is None  # vLLM's qkv_proj stacks rows
    gate, up = pruned_2_of_4(96, 128, seed=4), torch.randn(96, 128, dtype=torch.bfloat16)
    assert "not 2:4" in unsupported_reason(torch.cat([gate, up]), "cutlass")  # one dense part spoils the merge


def test_dispatch_picks_dense_below_the_threshold_and_sparse_from_it():
    # tokens -> (dense ms, sparse ms), as the GPU benchmark measures them
    timings = {1: (0.05, 0.09), 16: (0.06, 0.08), 128: (0.20, 0.18), 1024: (1.4, 1.0), 8192: (11.0, 7.5)}
    threshold = threshold_from_timings(timings)
    assert threshold == 128
    assert [use_sparse(tokens, threshold) for tokens in (1, 127, 128, 4096)] == [False, False, True, True]
    # a win at 16 that is lost again at 128 does not count: sparse must win from the threshold up
    assert threshold_from_timings({16: (0.08, 0.07), 128: (0.2, 0.3), 1024: (1.4, 1.0)}) == 1024
    assert threshold_from_timings({1: (0.05, 0.09), 8192: (11.0, 12.0)}) is None
    assert not use_sparse(10**6, None)


def test_a_cpu_plan_keeps_every_layer_dense_and_says_why():
    kept, record = plan_layer(torch.randn(64, 128, dtype=torch.bfloat16))
    assert kept is None and record["2:4"] is False and record["reason"].startswith("not 2:4 along the input dimension")
    kept, record = plan_layer(pruned_2_of_4(64, 128))
    assert kept is None and record["2:4"] is True and record["path"] == "dense"
    if not torch.cuda.is_available():
        assert record["reason"].startswith("2:4 kernels unavailable: no CUDA device")


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Make plan_layer believe the kernels exist; the 'compressed' weight is 2 × the weight, so the path taken shows."""
    def fake_compress(weight, backend):
        doubled = 2 * weight
        doubled.packed, doubled.meta = doubled, None
        return doubled

    monkeypatch.setattr(sparse24, "runtime_unavailable_reason", lambda device: None)
    monkeypatch.setattr(sparse24, "compress", fake_compress)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)


def test_plan_takes_over_a_2_of_4_layer_and_dispatches_by_token_count(pretend_gpu):
    timings = {1: (0.05, 0.09), 16: (0.06, 0.08), 128: (0.20, 0.18), 1024: (1.4, 1.0)}  # a fake timing table
    weight = pruned_2_of_4(64, 128)
    sparse, record = plan_layer(weight, lambda *shape_dtype_backend_device: threshold_from_timings(timings))
    assert record == {"shape": [64, 128], "dtype": "bfloat16", "2:4": True, "path": "sparse", "backend": "cusparselt",
                      "threshold_tokens": 128, "extra_bytes": 64 * 128 * 2}  # the dense copy stays for small calls
    decode = torch.randn(3, 5, 128, dtype=torch.bfloat16)  # 15 tokens: below the threshold
    prefill = torch.randn(2, 64, 128, dtype=torch.bfloat16)  # 128 tokens
    assert torch.equal(sparse.linear(decode), F.linear(decode, weight))
    assert torch.equal(sparse.linear(prefill), F.linear(prefill, 2 * weight))

    always, record = plan_layer(weight, lambda *args: 1)  # sparse wins from one token: no dense copy
    assert always.dense is None and record["extra_bytes"] == 0  # the fake compressed copy is as large as the dense one
    assert torch.equal(always.linear(decode), F.linear(decode, 2 * weight))


def test_plan_keeps_layers_dense_where_sparse_never_wins_or_cannot_fit(pretend_gpu):
    kept, record = plan_layer(pruned_2_of_4(64, 128), lambda *args: None)
    assert kept is None and record["reason"] == ("cusparselt: never faster than dense at the timed token counts; "
                                                 "cutlass: never faster than dense at the timed token counts")
    kept, record = plan_layer(pruned_2_of_4(40, 128), lambda *args: 1)
    assert kept is None and "cusparselt: shape 40x128 is not a multiple of" in record["reason"] and "cutlass: shape 40x128" in record["reason"]
    summary = summarize_plan([record, {**record, "layer": "b"}])
    assert (summary["layers"], summary["2:4"], summary["sparse"]) == (2, 2, 0)
    assert describe_plan(summary).startswith("0 of 2 linear layers on the 2:4 kernels (2 are 2:4), extra memory +0.0 MiB; dense: 2 × ")


def test_this_machine_says_why_it_falls_back():
    reason = runtime_unavailable_reason()
    assert reason is None or "CUDA" in reason or "compute capability" in reason
    if not torch.cuda.is_available():
        assert reason.startswith("no CUDA device")


def test_gpu_benchmark_dry_run_checks_its_arithmetic(tmp_path):
    out = tmp_path / "gpu_sparse.md"
    run = subprocess.run([sys.executable, "bench/gpu_sparse.py", "--dry-run", "--repeats", "2", "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    timed = [row for row in result["gemm"] if "tokens" in row]
    assert len(timed) == 2 * 2 * 3 and all(row["max_abs_diff"] == 0.0 for row in timed)  # 2 shapes, 2 backends, 3 sizes
    assert set(result["thresholds"]) == {"64x128 cutlass", "64x128 cusparselt", "128x64 cutlass", "128x64 cusparselt"}
    assert result["end_to_end"]["max_abs_logit_diff"] == 0.0
    assert "| tiny | a | 64x128 | cutlass | 1 |" in out.read_text()
