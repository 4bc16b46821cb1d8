"""export ort-genai: onnxruntime-genai's model builder on tiny pruned LLaMA and Qwen2 models, checked against PyTorch."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import onnxruntime_genai as og
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VOCAB, pruned_model_dir
from exporters.ort_genai import OrtGenaiExport, check_zeros, dequantize_nbits, export_ort_genai, genai_greedy, source_zeros
from exporters.verify import torch_greedy
from wanda_serve.cli import cli
from wanda_serve.contract import GREEDY_TOKENS, MANIFEST_NAME, PROMPTS
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sources")
    return {arch: pruned_model_dir(root / arch, arch, tiny_tokenizer) for arch in ("llama", "qwen2", "opt")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sources):
    """export(arch, precision) -> (out, manifest), each made once."""
    root, done = tmp_path_factory.mktemp("exports"), {}

    def export(arch, precision):
        if (arch, precision) not in done:
            out = root / f"{arch}-{precision}"
            done[(arch, precision)] = out, export_ort_genai(OrtGenaiExport(out, str(sources[arch]), precision))
        return done[(arch, precision)]

    return export


def source_linears(source):
    return block_linears(AutoModelForCausalLM.from_pretrained(source).eval())


def pruned_count(source) -> int:
    return sum(int((linear.weight == 0).sum()) for linear in source_linears(source).values())


def native_greedy(out, tokenizer, prompt) -> list[int]:
    """onnxruntime-genai's own greedy search (it stops at end-of-sequence)."""
    model = og.Model(str(out))
    ids = tokenizer(prompt)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + GREEDY_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    while not generator.is_done():
        generator.generate_next_token()
    return generator.get_sequence(0).tolist()[len(ids):]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_export_reproduces_pytorch_and_keeps_every_zero(arch, exported, sources):
    out, manifest = exported(arch, "fp32")
    check = manifest["checks"]["greedy"]
    assert check["greedy_equal"] and check["greedy_tokens_agreeing"] == [GREEDY_TOKENS] * len(PROMPTS)
    assert check["max_log_prob_gap"] < 1e-4
    zeros = manifest["zeros"]
    assert zeros["kept"] and zeros["pruned_not_zero"] == 0 and zeros["source_zeros"] == pruned_count(sources[arch]) > 0

    # Independently of the exporter's lookup: each source weight, transposed, is an exact column block of
    # one of the graph's initializers, zeros in the same places.
    graph = onnx.load(str(out / "model.onnx"), load_external_data=True).graph
    matrices = [numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 2]
    for name, linear in source_linears(sources[arch]).items():
        weight = linear.weight.detach().numpy().T  # (in, out)
        found = [m[:, c:c + weight.shape[1]] for m in matrices if m.shape[0] == weight.shape[0]
                 for c in range(m.shape[1] - weight.shape[1] + 1) if np.array_equal(m[:, c:c + weight.shape[1]], weight)]
        assert found, f"{name} is not in the graph"
        assert np.array_equal(found[0] == 0, weight == 0)

    # onnxruntime-genai's own greedy search gives PyTorch's tokens, up to an end-of-sequence it stops at.
    # The directory's tokenizer, as the exporter loads it: transformers loads Qwen2's as Qwen2Tokenizer, which
    # splits text unlike the tokenizer object it was saved from.
    tokenizer = AutoTokenizer.from_pretrained(sources[arch])
    reference = torch_greedy(AutoModelForCausalLM.from_pretrained(sources[arch]).eval(), tokenizer)
    for prompt, expected in zip(PROMPTS, reference):
        tokens = native_greedy(out, tokenizer, prompt)
        assert tokens == expected[:len(tokens)] and (len(tokens) == GREEDY_TOKENS or tokens[-1] == tokenizer.eos_token_id)
    assert check["prompts"][0]["tokens"] == reference[0]
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", MANIFEST_NAME} <= {p.name for p in out.iterdir()}
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert json.loads((out / MANIFEST_NAME).read_text())["builder"]["version"] == og.__version__


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_export_is_symmetric_and_reports_zeros_and_agreement(arch, exported, sources):
    out, manifest = exported(arch, "int4")
    assert manifest["builder"]["extra_options"]["is_symmetric"] == "true"
    assert [(s["bits"], s["zero_points"]) for s in manifest["quantization"]["schemes"]] == [(4, False)]
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    zeros = manifest["zeros"]
    assert zeros["source_zeros"] == pruned_count(sources[arch]) > 0
    assert zeros["kept"] and zeros["pruned_not_zero"] == 0  # symmetric: a zero weight is the code 8, (8 - 8) * scale
    assert set(zeros["layers"]) == set(source_linears(sources[arch]))
    assert zeros["exported_zeros"] > zeros["source_zeros"]  # small weights round to 0 too

    check = manifest["checks"]["greedy"]
    reference = manifest["checks"]["pytorch_reference"]["greedy"]
    assert 0 < check["max_log_prob_gap"] < 0.5  # quantized: close, not equal
    assert check["greedy_equal"] == all(p["equal"] for p in check["prompts"])
    for prompt, expected, agreeing in zip(check["prompts"], reference, check["greedy_tokens_agreeing"]):
        tokens, first = prompt["tokens"], prompt["first_divergence"]
        assert len(tokens) == GREEDY_TOKENS and (first is None) == prompt["equal"] == (tokens == expected)
        assert agreeing == (GREEDY_TOKENS if first is None else first)
        if first is not None:
            assert tokens[:first] == expected[:first] and tokens[first] != expected[first]


def run_matmul_nbits(packed, scales, zero_points, k, n, bits, block_size) -> np.ndarray:
    """What onnxruntime's own MatMulNBits computes for an identity input: the weight it dequantizes, (K, N)."""
    inputs = ["A", "B", "scales"] + (["zero_points"] if zero_points is not None else [])
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size)
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "zero_points"))
    graph = helper.make_graph([node], "dequantize", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [k, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


def test_dequantization_matches_onnxruntime(exported):
    out, _ = exported("llama", "int4")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=True).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    node = next(n for n in graph.node if n.name.startswith("/model/layers.0/attn/qkv_proj/MatMul"))
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arrays = [initializers[name] for name in node.input[1:3]]
    args = (attributes["K"], attributes["N"], attributes["bits"], attributes["block_size"])
    ours, runtime = dequantize_nbits(*arrays, None, *args), run_matmul_nbits(*arrays, None, *args)
    assert np.allclose(ours, runtime, rtol=1e-6, atol=0) and np.array_equal(ours == 0, runtime == 0)

    # Asymmetric: 4-bit zero points packed two to a byte, each row padded to a whole byte (3 blocks here).
    rng = np.random.default_rng(0)
    k, n, block = 96, 8, 32
    packed = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.5, 2, (n, k // block)).astype(np.float32)
    zero_points = rng.integers(0, 256, (n, 2), dtype=np.uint8)
    ours, runtime = dequantize_nbits(packed, scales, zero_points, k, n, 4, block), run_matmul_nbits(packed, scales, zero_points, k, n, 4, block)
    assert np.allclose(ours, runtime, rtol=1e-6, atol=0) and np.array_equal(ours == 0, runtime == 0) and (ours == 0).any()


def _first_pruned_position(source, layer):
    weight = source_linears(source)[layer].weight.detach().numpy().T  # (in, out)
    k, n = np.argwhere(weight == 0)[0]
    return int(k), int(n)


def _save_modified(out, target, name, change):
    model = onnx.load(str(out / "model.onnx"), load_external_data=True)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor).copy()
    change(values)
    tensor.CopyFrom(numpy_helper.from_array(values, name))
    target.mkdir()
    onnx.save(model, str(target / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return target / "model.onnx"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_zero_check_finds_one_pruned_weight_that_is_not_zero(precision, exported, sources, tmp_path):
    out, _ = exported("llama", precision)
    k, n = _first_pruned_position(sources["llama"], "1.mlp.down_proj")
    zeros = source_zeros(AutoModelForCausalLM.from_pretrained(sources["llama"]))
    if precision == "fp32":
        name = "model.layers.1.mlp.down_proj.MatMul.weight"

        def change(values):
            values[k, n] = 0.5
    else:
        name = "model.layers.1.mlp.down_proj.MatMul.weight_Q4"

        def change(values):  # (N, blocks, 16 bytes): input k of output n is byte k // 2, low nibble if k is even
            row = values[n].reshape(-1)
            byte = row[k // 2]
            assert (byte >> (4 * (k % 2))) & 0xF == 8  # symmetric: the pruned weight is stored as 8
            row[k // 2] = byte ^ (0x1 << (4 * (k % 2)))  # 8 -> 9: one step of its block's scale
            values[n] = row.reshape(values[n].shape)
    result = check_zeros(_save_modified(out, tmp_path / "modified", name, change), zeros)
    assert not result["kept"] and result["pruned_not_zero"] == 1
    assert [layer for layer, counts in result["layers"].items() if counts["pruned_not_zero"]] == ["1.mlp.down_proj"]


def _differing(*args):
    result = genai_greedy(*args)  # the real one, imported before the test replaces it
    tokens = [(result["tokens"][0] + 1) % VOCAB] + result["tokens"][1:]
    return {**result, "tokens": tokens, "equal": False, "first_divergence": 0}


def test_fp32_fails_without_output_when_greedy_differs_int4_reports_it(sources, tmp_path, monkeypatch):
    monkeypatch.setattr("exporters.ort_genai.genai_greedy", _differing)
    with pytest.raises(WandaServeError, match=r"export check failed: onnxruntime-genai's greedy continuation differs from "
                                              r"PyTorch's \(tokens agreeing per prompt: \[0, 0\] of 32"):
        export_ort_genai(OrtGenaiExport(tmp_path / "fp32", str(sources["llama"]), "fp32"))
    manifest = export_ort_genai(OrtGenaiExport(tmp_path / "int4", str(sources["llama"]), "int4"))
    assert manifest["checks"]["greedy"]["greedy_tokens_agreeing"] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def run_cli(*args):
    env = {key: value for key, value in os.environ.items() if key != "WANDA_SERVE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "wanda_serve", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)


def one_error_line(result) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stdout + result.stderr
    return lines[0]


def test_cli_refuses_an_architecture_the_builder_does_not_convert(sources, tmp_path):
    line = one_error_line(run_cli("export", "ort-genai", sources["opt"], "--out", tmp_path / "out" / "opt"))
    assert line == (f"Error: onnxruntime-genai's model builder ({og.__version__}) cannot convert {sources['opt']} "
                    f"(OPTForCausalLM): The {sources['opt']} model is not currently supported.")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the parent made for it, nor a temporary directory


def test_cli_refuses_an_existing_output(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(run_cli("export", "ort-genai", sources["llama"], "--out", out))
    assert line == f"Error: output directory {out} exists and is not empty (use --overwrite to replace it)"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_refuses_fp16_on_the_cpu_and_a_missing_onnxruntime_genai(sources, tmp_path, monkeypatch):
    run = lambda *args: CliRunner().invoke(cli, ["export", "ort-genai", str(sources["llama"]), "--out", str(tmp_path / "o"), *args])
    result = run("--precision", "fp16")
    assert result.exit_code == 1 and result.output == (
        "Error: onnxruntime-genai's model builder makes fp16 models for CUDA only: "
        "use --execution-provider cuda, or --precision fp32 or int4 for the CPU\n")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if it were not installed
    result = run()
    assert result.exit_code == 1 and result.output == (
        "Error: export ort-genai needs onnxruntime-genai, onnx and onnx_ir (onnxruntime_genai is missing): "
        "pip install 'wanda-serve[onnx]' (or: pip install onnxruntime-genai)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch, int8_layers, option", [("llama", "mixed", "mixed_layers:int8"), ("qwen2", "last", "last_matmul:int8")])
def test_int4_quality_settings_reach_the_graph_and_keep_every_zero(sources, tmp_path, arch, int8_layers, option):
    out = tmp_path / "int4-fp32-compute"
    result = run_cli("export", "ort-genai", sources[arch], "--out", out, "--accuracy-level", "1", "--int8-layers", int8_layers)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["builder"]["extra_options"] == {"hf_token": "false", "is_symmetric": "true", "accuracy_level": "1",
                                                   "matmul_mixed_precision": option}
    # Some MatMuls at 4 bits, the chosen ones at 8, all computed on float32 activations, none with zero points.
    assert [(s["bits"], s["accuracy_level"], s["zero_points"]) for s in manifest["quantization"]["schemes"]] == [(4, 1, False), (8, 1, False)]
    zeros = manifest["zeros"]
    assert zeros["kept"] and zeros["source_zeros"] == pruned_count(sources[arch]) > 0
    assert 0 < manifest["checks"]["greedy"]["max_log_prob_gap"] < 0.5


def test_cli_refuses_int4_settings_that_do_not_apply(sources, tmp_path):
    run = lambda *args: run_cli("export", "ort-genai", sources["llama"], "--out", tmp_path / "o", *args)
    line = one_error_line(run("--precision", "fp32", "--accuracy-level", "1"))
    assert line == "Error: --accuracy-level and --int8-layers set how int4 weights are quantized; --precision is fp32"
    assert one_error_line(run("--int8-layers", "last")) == (
        f"Error: --int8-layers last: {sources['llama']}'s lm_head is tied to its embeddings, and onnxruntime-genai's model "
        f"builder ({og.__version__}) writes an invalid graph for a tied int8 lm_head; use --int8-layers mixed or none")
    unknown = run("--int8-layers", "all")
    assert unknown.returncode == 2 and unknown.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--int8-layers': 'all' is not one of 'none', 'mixed', 'last'.")
    assert list(tmp_path.iterdir()) == []
