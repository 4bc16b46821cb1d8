"""Exports of the real SmolLM2, pruned with Wanda 2:4, each checked in its target runtime."""

import json

import pytest
from click.testing import CliRunner

from exporters.onnx_runtime import OnnxCausalLM
from wanda_serve.cli import cli
from wanda_serve.contract import vllm_python

pytestmark = pytest.mark.e2e


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "wanda-2of4"
    run("prune", "--out", out, "--nsamples", 8, "--seqlen", 256, "--no-eval")
    return out


def test_vllm_export_of_pruned_smollm2(pruned_smollm2, tmp_path):
    out = tmp_path / "vllm"
    result = run("export", "vllm", pruned_smollm2, "--out", out, "--dtype", "bfloat16")
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["zeros_kept"]["kept"] == manifest["zeros_kept"]["source"] > 0
    assert manifest["sparsity"]["exported"]["all_nm_valid"]["2:4"]
    assert manifest["checks"]["transformers_reload_max_abs_logit_diff"] == 0.0
    assert manifest["source_prune_report"]["structure"] == "2:4"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "sparsity_config" not in config
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    assert vllm_python() is not None, "make test installs vLLM (.venv-vllm) and points WANDA_SERVE_VLLM_PYTHON at it"
    assert manifest["checks"]["vllm"]["status"] == "passed" and len(manifest["checks"]["vllm"]["greedy"][0]) == 32
    assert "vLLM greedy: passed" in result.output


def test_onnx_export_of_pruned_smollm2(pruned_smollm2, tmp_path):
    out = tmp_path / "onnx"
    run("export", "onnx", pruned_smollm2, "--out", out)
    manifest = json.loads((out / "export_manifest.json").read_text())
    check = manifest["variants"]["model.onnx"]["check"]
    assert check["max_abs_logit_diff"] < 1e-3 and check["greedy_equal"] and check["greedy_tokens_agreeing"] == [32, 32]
    assert manifest["zeros"]["kept"] and manifest["zeros"]["exported_zeros"] == manifest["zeros"]["source_zeros"] > 50_000_000
    result = run("generate-onnx", out, "What is the capital of France?", "--chat", "--max-new-tokens", 16)
    assert result.output.strip()
    assert OnnxCausalLM(out / "model.onnx", provider="cpu").kv_heads == 3
