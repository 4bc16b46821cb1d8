"""The CUDA path on a tiny model: pruning (each solver family, with refinement) and recovery on the GPU give what
the CPU gives. Skipped without CUDA (CI has none); bench/gpu_checks.sh runs it on a GPU machine."""

import json

import pytest
import torch

from test_cli import run, small_prune_args
from test_recover import job, kl_to_teacher, zeros
from wanda_serve.recover import run_recover

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "alps"])
def test_prune_on_cuda_gives_the_cpu_result(method, tiny_model_dir, tmp_path):
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = run(*small_prune_args(tiny_model_dir, out, "--method", method, "--refine", 2, "--device", device))
        assert result.exit_code == 0, result.output
        reports[device] = json.loads((out / "prune_report.json").read_text())
    on_gpu = reports["cuda"]
    assert on_gpu["device"] == "cuda" and on_gpu["memory"]["peak_cuda_allocated_mib"] > 0
    assert on_gpu["sparsity"]["all_nm_valid"]["2:4"]
    # other kernels round differently and can flip near-tied 2:4 choices: close, not equal
    assert on_gpu["perplexity"]["pruned"]["perplexity"] == pytest.approx(reports["cpu"]["perplexity"]["pruned"]["perplexity"], rel=0.05)


def test_recovery_on_cuda_lowers_the_kl_and_keeps_every_zero(pruned, tiny_model_dir, tmp_path):
    report = run_recover(job(pruned, tmp_path / "rec", tokens=4096, device="cuda"))
    assert kl_to_teacher(tmp_path / "rec", tiny_model_dir) < 0.8 * kl_to_teacher(pruned, tiny_model_dir)
    before, after = zeros(pruned), zeros(tmp_path / "rec")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert report["mask_check"]["passed"]
