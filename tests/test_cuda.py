"""The CUDA path: pruning (each solver family, with refinement) and recovery of a tiny model on the GPU give what
the CPU gives; the 2:4 runtime picks its path by whether a call is being captured in a CUDA graph, on the real
kernels. Skipped without CUDA (CI has none); bench/gpu_checks.sh runs it on a GPU machine."""

import json

import pytest
import torch
import torch.nn.functional as F

from deploy.sparse24 import Execution, Sparse24Weight, plan_layer, relative_error, run_in_cuda_graph, tolerance
from test_cli import run, small_prune_args
from test_recover import job, kl_to_teacher, zeros
from test_sparse24 import pruned_2_of_4
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


def test_a_captured_call_takes_the_sparse_path_and_an_eager_one_the_dense_path():
    """Thresholds as on an H200 (docs/gpu_sparse.md): cuSPARSELt never wins eagerly, wins replayed from a graph."""
    weight = pruned_2_of_4(4096, 4096).cuda()
    sparse = Sparse24Weight.pack(weight, "cusparselt").with_thresholds(weight, None, 16)
    x = torch.randn(256, 4096, dtype=torch.bfloat16, device="cuda")
    dense = F.linear(x, weight)
    assert torch.equal(sparse.linear(x), dense)
    replayed = run_in_cuda_graph(lambda: sparse.linear(x))
    assert not torch.equal(replayed, dense)  # the kernels round differently: the sparse path ran
    assert relative_error(replayed, dense) <= tolerance(torch.bfloat16)


def test_the_plan_times_eager_and_replayed_calls_on_the_gpu():
    weight = pruned_2_of_4(14336, 4096).cuda()
    sparse, record = plan_layer(weight, execution=Execution(compiled=True, cuda_graphs=True))
    print(record)  # this GPU's thresholds
    if sparse is None:
        assert record["reason"].startswith("cusparselt: never faster than dense at the timed token counts, eagerly or in CUDA graphs")
    else:
        assert record["backend"] == "cusparselt" and "graph_threshold_tokens" in record
