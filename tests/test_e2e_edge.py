"""Edge exports of the real SmolLM2, pruned with the default recipe: onnxruntime-genai int4 and GGUF q8_0, each made
by the installed CLI in its own process and checked through its manifest; then bench/edge.py's onnxruntime-genai
runtime (the perplexity and timing path of docs/edge_benchmark.md) on the int4 export."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from wanda_serve.contract import GREEDY_TOKENS, MANIFEST_NAME, PROMPTS

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parent.parent / "bench"


def wanda_serve(*args) -> str:
    run = subprocess.run([sys.executable, "-m", "wanda_serve", *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    """The default recipe (`wanda-serve prune` without method options: wanda 2:4 with permutation) on a small calibration set."""
    out = tmp_path_factory.mktemp("edge") / "wanda-2of4"
    wanda_serve("prune", "--out", out, "--nsamples", 8, "--seqlen", 128, "--no-eval")
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "wanda" and report["structure"] == "2:4" and report["permutation"]
    assert report["sparsity"]["all_nm_valid"]["2:4"]
    return out


@pytest.fixture(scope="module")
def genai_int4(pruned_smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge") / "genai-int4"
    output = wanda_serve("export", "ort-genai", pruned_smollm2, "--out", out, "--precision", "int4")
    return out, json.loads((out / MANIFEST_NAME).read_text()), output


@pytest.fixture(scope="module")
def gguf_q8_0(pruned_smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge") / "pruned.gguf"
    output = wanda_serve("export", "gguf", pruned_smollm2, "--out", out, "--type", "q8_0")
    return out, json.loads(out.with_name(out.name + ".manifest.json").read_text()), output


def test_ort_genai_int4_export_keeps_every_zero_and_reports_greedy_agreement(genai_int4):
    out, manifest, output = genai_int4
    assert (out / "genai_config.json").is_file() and (out / "model.onnx.data").is_file()
    assert manifest["builder"]["precision"] == "int4" and manifest["builder"]["execution_provider"] == "cpu"
    assert all(scheme["bits"] == 4 and not scheme["zero_points"] for scheme in manifest["quantization"]["schemes"])
    zeros = manifest["zeros"]
    assert zeros["kept"] and zeros["pruned_not_zero"] == 0 and zeros["source_zeros"] > 50_000_000
    assert all(layer["pruned_not_zero"] == 0 for layer in zeros["layers"].values()) and len(zeros["layers"]) == 30 * 7
    checks = manifest["checks"]
    assert checks["provider"] == "cpu" and checks["greedy_must_equal"] is False  # int4: reported, not required
    greedy = checks["greedy"]
    assert len(greedy["greedy_tokens_agreeing"]) == len(PROMPTS)
    assert all(0 <= agreeing <= GREEDY_TOKENS for agreeing in greedy["greedy_tokens_agreeing"])
    assert all(len(prompt["tokens"]) == GREEDY_TOKENS for prompt in greedy["prompts"])
    assert math.isfinite(greedy["max_log_prob_gap"]) and greedy["max_log_prob_gap"] >= 0
    assert f"pruned zeros kept: all {zeros['source_zeros']}" in output
    assert "greedy vs PyTorch float32 on onnxruntime-genai (cpu): " in output
    print(f"onnxruntime-genai int4 greedy tokens agreeing with PyTorch fp32: {greedy['greedy_tokens_agreeing']} of {GREEDY_TOKENS}, "
          f"max log-prob gap {greedy['max_log_prob_gap']:.3g}")


def test_gguf_q8_0_export_reads_back_within_tolerance_with_every_zero(gguf_q8_0):
    out, manifest, output = gguf_q8_0
    assert out.is_file() and manifest["file"]["bytes"] == out.stat().st_size
    assert manifest["type"]["name"] == "q8_0" and manifest["architecture"]["gguf"] == "llama"
    checks = manifest["checks"]
    logits = checks["logits"]
    assert logits["passed"] and logits["tolerance"] == 0.1 and logits["relative_diff"] <= logits["tolerance"]
    assert checks["weights"]["passed"] and checks["tokenizer"]["identical"]
    zeros = checks["zeros"]
    assert zeros["required"] and zeros["kept"] and zeros["zeros_lost"] == 0 and zeros["source_zeros"] > 50_000_000
    assert zeros["zeros_kept"] == zeros["source_zeros"]
    assert len(checks["greedy"]["tokens_agreeing"]) == len(PROMPTS)
    assert f"pruned zeros kept: {zeros['source_zeros']} of {zeros['source_zeros']}" in output
    print(f"GGUF q8_0 read back: logits within {logits['relative_diff']:.2%} of the largest; greedy tokens agreeing "
          f"{checks['greedy']['tokens_agreeing']} of {GREEDY_TOKENS}")


def test_bench_edge_runs_the_int4_export_through_onnxruntime_genai(pruned_smollm2, genai_int4):
    """What bench/edge.py measures on onnxruntime-genai: every position's logits of a window (perplexity), and a
    timed greedy generation through its KV cache, against PyTorch on the same pruned model."""
    from transformers import AutoTokenizer

    from wanda_serve.data import evaluation_ids, load_corpus
    from wanda_serve.evaluate import perplexity

    sys.path.insert(0, str(BENCH))
    import edge_runtimes

    ids = evaluation_ids(load_corpus("wiki"), AutoTokenizer.from_pretrained(pruned_smollm2))
    genai, pytorch = edge_runtimes.GenaiRuntime(genai_int4[0]), edge_runtimes.TorchRuntime.load(pruned_smollm2, "float32")
    window = ids[:128].unsqueeze(0)
    logits = genai.logits(window)
    assert tuple(logits.shape) == (1, 128, 49152) and bool(logits.isfinite().all())
    on_genai, on_pytorch = (perplexity(runtime.logits, ids, 128, 2, progress=False).perplexity for runtime in (genai, pytorch))
    assert 0.9 < on_genai / on_pytorch < 2.5, (on_genai, on_pytorch)  # int4 weights (and int8 activations) cost some
    prompt = ids[256:288].tolist()
    generated, reference = genai.generate(prompt, 8), pytorch.generate(prompt, 8)
    assert len(generated.tokens) == len(reference.tokens) == 8
    assert generated.prefill_seconds > 0 and generated.decode_seconds > 0
    agreeing = next((i for i, (a, b) in enumerate(zip(generated.tokens, reference.tokens)) if a != b), 8)
    print(f"perplexity, 2 windows of 128: PyTorch fp32 {on_pytorch:.2f}, onnxruntime-genai int4 {on_genai:.2f}; "
          f"greedy tokens agreeing: {agreeing} of 8")
