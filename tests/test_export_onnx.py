import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from conftest import TEXT, VOCAB, pruned_model_dir
from exporters.onnx_export import OnnxExport, export_onnx
from exporters.onnx_runtime import OnnxCausalLM
from exporters.verify import torch_greedy
from wanda_serve.cli import cli
from wanda_serve.contract import PROMPTS, EvalOptions
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("onnx")
    source = pruned_model_dir(root / "llama", "llama", tiny_tokenizer)
    (root / "text.txt").write_text(TEXT)
    out = root / "llama-onnx"
    manifest = export_onnx(OnnxExport(out, str(source), quantize=("int8", "int4"),
                                      evaluation=EvalOptions(str(root / "text.txt"), 64, 2), progress=False))
    return source, out, manifest


def test_fp32_export_matches_pytorch_and_keeps_zeros(llama_export):
    source, out, manifest = llama_export
    main = manifest["variants"]["model.onnx"]["check"]
    assert main["max_abs_logit_diff"] < 1e-3 and main["greedy_equal"]
    assert main["greedy_tokens_agreeing"] == [32, 32]
    assert manifest["zeros"]["kept"] and manifest["zeros"]["source_zeros"] == manifest["zeros"]["exported_zeros"] > 0

    graph = onnx.load(str(out / "model.onnx"), load_external_data=True).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    reference = AutoModelForCausalLM.from_pretrained(source)
    for name, linear in block_linears(reference).items():
        index, path = name.split(".", 1)
        exported = weights[f"model.layers.{index}.{path}.weight_T"]
        assert np.array_equal(exported == 0, linear.weight.detach().numpy().T == 0)
        assert ((exported == 0).reshape(-1, 4, exported.shape[1]).sum(1) >= 2).all()  # 2:4 along inputs
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "export_manifest.json"} <= {p.name for p in out.iterdir()}


def test_dynamic_batch_and_kv_cache_decode(llama_export, tiny_tokenizer):
    source, out, _ = llama_export
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    runner = OnnxCausalLM(out / "model.onnx", provider="cpu")
    assert runner.provider == "CPUExecutionProvider"
    for batch, length in [(1, 5), (3, 17)]:
        ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(ids).logits.numpy()
        assert np.abs(runner.logits(ids.numpy()) - expected).max() < 1e-4
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    assert runner.generate(prompt, 20) == torch_greedy(model, tiny_tokenizer, PROMPTS[:1], 20)[0]


def test_sampling_is_seeded(llama_export, tiny_tokenizer):
    runner = OnnxCausalLM(llama_export[1] / "model.onnx", provider="cpu")
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    first = runner.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=1)
    assert first == runner.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=1)
    assert first != runner.generate(prompt, 16, temperature=1.0, top_p=0.9, seed=2)


def test_quantized_variants_run_and_report_perplexity(llama_export):
    _, out, manifest = llama_export
    reference = manifest["pytorch_reference"]["perplexity"]["perplexity"]
    fp32 = manifest["variants"]["model.onnx"]["perplexity"]["perplexity"]
    assert fp32 == pytest.approx(reference, rel=1e-4)
    for name in ("model.int8.onnx", "model.int4.onnx"):
        variant = manifest["variants"][name]
        assert variant["check"]["max_abs_logit_diff"] > 0  # quantized: not bit-equal
        assert variant["perplexity"]["perplexity"] == pytest.approx(reference, rel=0.2)
        assert (out / name).is_file() and name in manifest["files"]
    ops = {node.op_type for node in onnx.load(str(out / "model.int4.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    assert "MatMulNBits" in {node.op_type for node in onnx.load(str(out / "model.int8.onnx"), load_external_data=False).graph.node}


@pytest.mark.parametrize("arch, dtype", [("qwen2", "float32"), ("llama", "float16")])
def test_second_architecture_and_fp16(tmp_path, tiny_tokenizer, arch, dtype):
    source = pruned_model_dir(tmp_path / arch, arch, tiny_tokenizer)
    manifest = export_onnx(OnnxExport(tmp_path / "out", str(source), dtype=dtype, progress=False))
    check = manifest["variants"]["model.onnx"]["check"]
    assert check["greedy_equal"] and check["max_abs_logit_diff"] < (1e-3 if dtype == "float32" else 5e-2)
    assert manifest["zeros"]["kept"] and manifest["zeros"]["exported_zeros"] > 0
    assert OnnxCausalLM(tmp_path / "out" / "model.onnx", provider="cpu").dtype == (np.float32 if dtype == "float32" else np.float16)


def test_failed_check_removes_the_output(tmp_path, tiny_tokenizer, monkeypatch):
    source = pruned_model_dir(tmp_path / "llama", "llama", tiny_tokenizer)
    monkeypatch.setattr("exporters.onnx_export.compare_with_torch",
                        lambda *a: {"max_abs_logit_diff": 0.5, "greedy_equal": False})
    with pytest.raises(WandaServeError, match=r"export check failed: onnxruntime logits differ from PyTorch by 0.5 \(tolerance 0.001\)"):
        export_onnx(OnnxExport(tmp_path / "out", str(source), progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_cli_refusals(llama_export, tmp_path):
    source, out, _ = llama_export
    run = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])
    result = run("export", "onnx", source, "--out", out)
    assert result.exit_code == 1 and result.output.strip() == f"Error: output directory {out} exists and is not empty (use --overwrite to replace it)"
    result = run("export", "onnx", source, "--out", tmp_path / "o", "--dtype", "float16", "--quantize", "int4")
    assert result.output.strip() == "Error: weight-only quantization starts from the float32 graph: use --dtype float32"
    result = run("export", "onnx", tmp_path / "missing", "--out", tmp_path / "o")
    assert result.output.strip() == f"Error: no such path: {tmp_path / 'missing'}"
    result = run("generate-onnx", out, "The cat", "--max-new-tokens", 5)
    assert result.exit_code == 0 and result.output.strip()
    assert not (tmp_path / "o").exists()


def test_cuda_provider_without_onnxruntime_gpu_says_what_to_install(llama_export):
    from exporters.onnx_runtime import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("onnxruntime-gpu with a GPU is present")
    with pytest.raises(WandaServeError, match="onnxruntime has no CUDA provider here .*install onnxruntime-gpu"):
        OnnxCausalLM(llama_export[1] / "model.onnx", provider="cuda")
