import hashlib
import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import CONFIGS, TEXT
from exporters.onnx_export import OnnxExport, export_onnx
from wanda_serve.contract import MANIFEST_NAME
from exporters.vllm_checkpoint import VllmExport, export_vllm
from wanda_serve.cli import cli
from wanda_serve.errors import WandaServeError


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(tiny_model_dir), "--out", str(out), "--calib", str(tmp_path / "text.txt"),
                                      "--nsamples", "4", "--seqlen", "32", "--no-eval"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_export_keeps_zeros_and_2of4_in_every_dtype(pruned_dir, tmp_path, dtype):
    out = tmp_path / f"vllm-{dtype}"
    manifest = export_vllm(VllmExport(out, str(pruned_dir), dtype=dtype, vllm_check=False))
    assert manifest["dtype"] == dtype
    assert manifest["zeros_kept"]["kept"] == manifest["zeros_kept"]["source"] > 0
    assert manifest["sparsity"]["source"]["all_nm_valid"]["2:4"] and manifest["sparsity"]["exported"]["all_nm_valid"]["2:4"]
    assert manifest["checks"]["transformers_reload_max_abs_logit_diff"] == 0.0
    assert manifest["checks"]["vllm"] == {"status": "skipped (--no-vllm-check)"}
    assert manifest["source_prune_report"]["method"] == "wanda"

    weights = load_file(out / "model.safetensors")
    source = load_file(pruned_dir / "model.safetensors")
    for name, tensor in weights.items():
        assert tensor.dtype == getattr(torch, dtype), name
        if "layers" in name and name.endswith("proj.weight"):
            assert not ((source[name] == 0) & (tensor != 0)).any(), name
            groups = (tensor == 0).reshape(tensor.shape[0], -1, 4).sum(-1)
            assert (groups >= 2).all(), name
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", MANIFEST_NAME} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_large_models_are_sharded(pruned_dir, tmp_path):
    out = tmp_path / "sharded"
    manifest = export_vllm(VllmExport(out, str(pruned_dir), max_shard_size="100KB", vllm_check=False))
    shards = [name for name in manifest["files"] if name.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in manifest["files"]


def test_zero_masks_are_freed_before_the_vllm_check_reloads_the_weights(pruned_dir, tmp_path, monkeypatch):
    """At 1.5B parameters the source's and the export's masks are 0.2 GB each: the vLLM check's float32 reload of
    the whole model must not find them still alive."""
    import weakref

    import exporters.vllm_checkpoint as vllm_checkpoint

    masks, zero_masks = [], vllm_checkpoint._zero_masks

    def tracked_zero_masks(linears):
        found = zero_masks(linears)
        masks.extend(weakref.ref(mask) for mask in found.values())
        return found

    def check(directory, tokenizer):
        alive = sum(mask() is not None for mask in masks)
        return {"status": "passed" if alive == 0 else "failed", "reason": f"{alive} of {len(masks)} zero masks alive"}

    monkeypatch.setattr(vllm_checkpoint, "_zero_masks", tracked_zero_masks)
    monkeypatch.setattr(vllm_checkpoint, "check_on_vllm", check)
    manifest = export_vllm(VllmExport(tmp_path / "out", str(pruned_dir)))
    assert masks and manifest["checks"]["vllm"]["status"] == "passed"


def with_config(model_dir, **extra):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **extra}))


def test_sparsity_metadata_is_stripped(pruned_dir, tmp_path):
    with_config(pruned_dir, sparsity_config={"format": "dense", "sparsity_structure": "2:4"},
                quantization_config={"quant_method": "compressed-tensors", "format": "dense",
                                     "sparsity_config": {"format": "dense", "sparsity_structure": "2:4"}})
    out = tmp_path / "stripped"
    result = CliRunner().invoke(cli, ["export", "vllm", str(pruned_dir), "--out", str(out), "--no-vllm-check"])
    assert result.exit_code == 0, result.output
    assert "removed sparsity_config from the config (current vLLM refuses it)" in result.output
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config
    assert json.loads((out / MANIFEST_NAME).read_text())["stripped_metadata"] == [
        "sparsity_config", "quantization_config (compressed-tensors, sparsity only)"]


@pytest.mark.parametrize("extra, message", [
    ({"sparsity_config": {"format": "sparse-24-bitmask"}},
     "sparsity_config says the weights are stored as 'sparse-24-bitmask'; only dense-stored weights can be exported"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "the source is quantized (gptq); export a dense or pruned full-precision model"),
])
def test_compressed_or_quantized_sources_are_refused(pruned_dir, tmp_path, extra, message):
    with_config(pruned_dir, **extra)
    out = tmp_path / "refused"
    result = CliRunner().invoke(cli, ["export", "vllm", str(pruned_dir), "--out", str(out), "--no-vllm-check"])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {message}"
    assert not out.exists()


def test_bad_source_and_existing_output_are_refused(pruned_dir, tmp_path):
    result = CliRunner().invoke(cli, ["export", "vllm", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.strip() == f"Error: no such path: {tmp_path / 'missing'}"
    with pytest.raises(WandaServeError, match="exists and is not empty"):
        export_vllm(VllmExport(pruned_dir, str(pruned_dir), vllm_check=False))


def test_failed_check_removes_the_output(pruned_dir, tmp_path, monkeypatch):
    calls = []

    def drifting_logits(model, batch):
        calls.append(1)
        with torch.no_grad():
            return model(**batch).logits.float() + len(calls)

    monkeypatch.setattr("exporters.vllm_checkpoint.torch_logits", drifting_logits)
    out = tmp_path / "broken"
    with pytest.raises(WandaServeError, match="export check failed: the reloaded checkpoint's logits differ by 1"):
        export_vllm(VllmExport(out, str(pruned_dir), vllm_check=False))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_prune_then_export_vllm_then_onnx(tmp_path, tiny_tokenizer, tied):
    """Qwen2 has biases in q/k/v; its embeddings are tied or not. Both survive both exports."""
    source = tmp_path / "qwen2"
    config = CONFIGS["qwen2"]()
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)  # initialised to zeros, which any export would keep
    model.save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    (tmp_path / "text.txt").write_text(TEXT)
    pruned = tmp_path / "pruned"
    result = CliRunner().invoke(cli, ["prune", str(source), "--out", str(pruned), "--calib", str(tmp_path / "text.txt"),
                                      "--nsamples", "4", "--seqlen", "32", "--no-eval"])
    assert result.exit_code == 0, result.output

    vllm_dir = tmp_path / "vllm"
    manifest = export_vllm(VllmExport(vllm_dir, str(pruned), vllm_check=False))
    assert manifest["zeros_kept"]["kept"] == manifest["zeros_kept"]["source"] > 0
    assert manifest["sparsity"]["exported"]["all_nm_valid"]["2:4"]
    assert manifest["checks"]["transformers_reload_max_abs_logit_diff"] == 0.0
    weights, pruned_weights = load_file(vllm_dir / "model.safetensors"), load_file(pruned / "model.safetensors")
    for layer in range(config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            assert weights[name].dtype == torch.bfloat16 and weights[name].any()
            assert torch.equal(weights[name], pruned_weights[name].bfloat16())
    assert ("lm_head.weight" in weights) == (not tied)
    assert json.loads((vllm_dir / "config.json").read_text())["tie_word_embeddings"] == tied

    onnx_dir = tmp_path / "onnx"
    manifest = export_onnx(OnnxExport(onnx_dir, str(vllm_dir), progress=False))
    check = manifest["variants"]["model.onnx"]["check"]
    assert manifest["architecture"] == "Qwen2ForCausalLM"
    assert check["greedy_equal"] and check["max_abs_logit_diff"] < 1e-3
    assert manifest["zeros"]["kept"] and manifest["zeros"]["exported_zeros"] == manifest["zeros"]["source_zeros"] > 0
    names = {t.name for t in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.initializer}
    assert ("lm_head.weight_T" in names) == (not tied)
    assert {f"model.layers.0.self_attn.{proj}.weight_T" for proj in ("q_proj", "k_proj", "v_proj")} <= names
