"""Recovery on the real SmolLM2: a small budget already lowers the pruned model's perplexity, with the mask intact."""

import json

import pytest
from click.testing import CliRunner

from wanda_serve.cli import cli

pytestmark = pytest.mark.e2e


def test_a_small_recovery_lowers_perplexity_in_and_out_of_domain(tmp_path):
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    result = CliRunner().invoke(cli, ["prune", "--out", str(pruned), "--nsamples", "8", "--seqlen", "256", "--no-eval"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["recover", str(pruned), "--out", str(recovered), "--tokens", "8192", "--seqlen", "256",
                                      "--eval-windows", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((recovered / "recover_report.json").read_text())
    assert report["teacher"] == "SmolLM2-135M-Instruct"  # named by the prune report, found as the embedded model
    assert report["mask_check"]["passed"] and report["mask_check"]["nm_valid_after"]["2:4"]
    assert report["tokens"] == 8192 and not (tmp_path / "recovered.checkpoints").exists()
    for name, ppl in report["perplexity"].items():  # wiki (in domain) and news (out of domain)
        assert ppl["teacher"]["perplexity"] < ppl["after"]["perplexity"] < 0.9 * ppl["before"]["perplexity"], (name, ppl)
