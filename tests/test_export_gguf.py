"""GGUF export: tiny pruned LLaMA and Qwen2 models written as f16, bf16, q8_0 and q4_0, then read back.

The file is read back here on its own (transformers' GGUF loader, and gguf's reader for the raw
tensors), not through the manifest, so each test can fail when the export is wrong. The q/k
permutation is proven twice: against llama.cpp's rotary arithmetic, and by the export refusing a file
written without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import VOCAB, pruned_model_dir, tiny_model
from exporters import gguf_export, gguf_vocab
from exporters.gguf_export import LOGITS_TOLERANCE, GgufExport, export_gguf, llama_rope_permute
from exporters.verify import prompt_batch, tokens_agreeing
from wanda_serve.contract import PROMPTS
from wanda_serve.cli import cli
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError

# Multiplies the q and k weights of the test models. At the default init (std 0.02) attention is
# almost uniform, so q and k hardly matter: a file with a wrong q/k layout would give nearly the
# source's logits. With this, attention is sharp, as in a trained model.
Q_K_SCALE = 8.0
TYPES = ("f16", "bf16", "q8_0", "q4_0")
ROOT = Path(__file__).resolve().parent.parent


def sharpen_attention(model, scale: float = Q_K_SCALE):
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(scale)
            block.self_attn.k_proj.weight.mul_(scale)
    return model


def sharp_pruned_model_dir(path: Path, arch: str, tokenizer, scale: float = Q_K_SCALE) -> Path:
    return pruned_model_dir(path, arch, tokenizer, sharpen_attention(tiny_model(arch), scale))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-sources")
    return {arch: sharp_pruned_model_dir(root / arch, arch, tiny_tokenizer) for arch in ("llama", "qwen2")}


def read_back(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def relative_logit_diff(model, source_dir: Path) -> float:
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    batch = prompt_batch(AutoTokenizer.from_pretrained(source_dir))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = source(**batch).logits[real], model(**batch).logits[real]
    return float((got - expected).abs().max() / expected.abs().max())


def raw_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor in the file as gguf's reader sees it: name -> (ggml type, values as float32 in PyTorch's (out, in))."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)) for t in reader.tensors}


@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_reads_back_within_tolerance_and_keeps_zeros(sources, tmp_path, arch, gguf_type):
    source = sources[arch]
    out = tmp_path / "model.gguf"
    manifest = export_gguf(GgufExport(out, str(source), gguf_type))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.manifest.json"]  # no temporaries
    assert json.loads((tmp_path / "model.gguf.manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["file"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["architecture"]["q_k_rope_permuted"] == (arch == "llama")

    model = read_back(out)
    difference = relative_logit_diff(model, source)
    assert difference == pytest.approx(manifest["checks"]["logits"]["relative_diff"], rel=1e-4)
    if LOGITS_TOLERANCE[gguf_type] is not None:
        assert difference <= LOGITS_TOLERANCE[gguf_type]
    reference = AutoModelForCausalLM.from_pretrained(source)
    linears, zeros = block_linears(model), 0
    for name, linear in block_linears(reference).items():
        pruned = linear.weight.detach() == 0
        zeros += int(pruned.sum())
        assert (linears[name].weight.detach()[pruned] == 0).all(), name
    assert zeros == manifest["checks"]["zeros"]["source_zeros"] > 0

    # The file itself: llama.cpp's names and types, and the pruned zeros where llama.cpp finds the weights.
    tensors = raw_tensors(out)
    expected_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
    assert tensors["blk.1.ffn_down.weight"][0] == expected_type
    # q4_0 keeps the embedding, which is also the output matrix, at 8 bits, as llama.cpp's quantize keeps it finer
    assert tensors["token_embd.weight"][0] == ("Q8_0" if gguf_type == "q4_0" else expected_type)
    assert tensors["output_norm.weight"][0] == tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert ("output.weight" in tensors) == (arch == "qwen2")  # tiny LLaMA ties lm_head to the embedding
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    config = reference.config
    for name, linear in block_linears(reference).items():
        block, path = name.split(".", 1)
        gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}[path]
        weight = linear.weight.detach()
        if arch == "llama" and gguf_name in ("attn_q", "attn_k"):
            weight = llama_rope_permute(weight, config.num_attention_heads,
                                        config.num_attention_heads if gguf_name == "attn_q" else config.num_key_value_heads)
        stored = tensors[f"blk.{block}.{gguf_name}.weight"][1]
        assert stored.shape == tuple(weight.shape)
        assert (stored[weight.numpy() == 0] == 0).all(), name
        if gguf_type in ("f16", "bf16"):  # q8_0 and q4_0 may round a small surviving weight to 0 too
            assert np.array_equal(stored == 0, weight.numpy() == 0), name


def test_metadata_and_tokenizer_are_llama_cpps(sources, tmp_path, tiny_tokenizer):
    out = tmp_path / "llama.gguf"
    export_gguf(GgufExport(out, str(sources["llama"]), "q8_0"))
    fields = {name: field.contents() for name, field in gguf.GGUFReader(out).fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"]) == (2, 64, 4, 2, 16)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[-1] == gguf.TokenType.UNUSED
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the source tokenizer adds none
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "The dog walked 3 miles to see the river."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_permutation_is_the_rotary_layout_llama_cpp_computes():
    """transformers' LLaMA rotates dims i and i + d/2 of each head together (rotate_half); llama.cpp's
    LLAMA rope (GGML_ROPE_TYPE_NORM) rotates dims 2i and 2i+1, by the same angle position * base^(-2i/d).
    Rows permuted by llama_rope_permute, llama.cpp's rotation gives transformers' attention scores."""
    model = sharpen_attention(tiny_model("llama"))
    config, attention = model.config, model.model.layers[0].self_attn
    n_head, n_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    length = 9
    x = torch.randn(1, length, config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length)[None]

    def heads(t, n):  # (1, T, n * d) -> (1, n, T, d)
        return t.view(1, length, n, d).transpose(1, 2)

    def scores(q, k):
        return q @ k.repeat_interleave(n_head // n_kv, dim=1).transpose(-1, -2)

    with torch.no_grad():
        cos, sin = model.model.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(heads(attention.q_proj(x), n_head), heads(attention.k_proj(x), n_kv), cos, sin)
        expected = scores(q, k)

        theta = positions[0, :, None] * config.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2) / d)  # (T, d/2)

        def llama_cpp_rope(t):  # adjacent pairs (2i, 2i+1) rotated by theta[:, i]
            even, odd = t[..., 0::2], t[..., 1::2]
            return torch.stack((even * theta.cos() - odd * theta.sin(), even * theta.sin() + odd * theta.cos()), -1).flatten(-2)

        def llama_cpp_scores(wq, wk):
            return scores(llama_cpp_rope(heads(x @ wq.T, n_head)), llama_cpp_rope(heads(x @ wk.T, n_kv)))

        wq, wk = attention.q_proj.weight, attention.k_proj.weight
        permuted = llama_cpp_scores(llama_rope_permute(wq, n_head, n_head), llama_rope_permute(wk, n_head, n_kv))
        assert torch.allclose(permuted, expected, atol=1e-4, rtol=1e-4)
        unpermuted = llama_cpp_scores(wq, wk)
        assert (unpermuted - expected).abs().max() > 0.1 * expected.abs().max()

    # transformers' GGUF loader undoes exactly this permutation (so reading back sees the source's rows).
    for weight, kv in ((wq, n_head), (wk, n_kv)):
        stored = llama_rope_permute(weight.detach(), n_head, kv).numpy()
        assert not np.array_equal(stored, weight.detach().numpy())
        restored = LlamaTensorProcessor()._reverse_permute_weights(stored, n_head, kv)
        assert np.array_equal(restored, weight.detach().numpy())


@pytest.mark.parametrize("scale, caught_by", [(Q_K_SCALE, "logits"), (1.0, "tensors read back")])
def test_a_file_without_the_q_k_permutation_is_refused(tmp_path, tiny_tokenizer, monkeypatch, scale, caught_by):
    """Sharp attention: the logits check alone refuses it. Near-uniform attention (the default init)
    hides it from the logits; the per-tensor check still refuses it."""
    source = sharp_pruned_model_dir(tmp_path / "llama", "llama", tiny_tokenizer, scale)
    monkeypatch.setattr(gguf_export, "llama_rope_permute", lambda weights, n_head, n_head_kv: weights)
    with pytest.raises(WandaServeError, match=f"export check failed: .*{caught_by}"):
        export_gguf(GgufExport(tmp_path / "out" / "model.gguf", str(source), "f16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # nor the directory made for it


def test_a_wrong_pre_tokenizer_is_refused(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_vocab, "pre_tokenizer_name", lambda definition: "qwen2")  # splits digits one by one
    with pytest.raises(WandaServeError, match="export check failed: the tokenizer read back .*'qwen2'"):
        export_gguf(GgufExport(tmp_path / "model.gguf", str(sources["llama"]), "f16"))
    assert list(tmp_path.iterdir()) == []


def test_failed_check_keeps_the_existing_file(sources, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the user's file")
    (tmp_path / "model.gguf.manifest.json").write_text("{}")
    monkeypatch.setitem(gguf_export.LOGITS_TOLERANCE, "f16", 0.0)
    with pytest.raises(WandaServeError, match=r"export check failed: the GGUF file read back gives logits .* tolerance 0% for f16"):
        export_gguf(GgufExport(out, str(sources["qwen2"]), "f16", overwrite=True))
    assert out.read_bytes() == b"the user's file" and (tmp_path / "model.gguf.manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.manifest.json"]


def test_cli_writes_and_overwrites(sources, tmp_path):
    out = tmp_path / "nested" / "model.gguf"
    run = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])
    result = run("export", "gguf", sources["qwen2"], "--out", out, "--type", "q8_0")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}  (q8_0, ") and "pruned zeros kept: 36864 of 36864" in result.stdout
    first = out.read_bytes()
    result = run("export", "gguf", sources["llama"], "--out", out, "--type", "bf16", "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != first and gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert json.loads(Path(f"{out}.manifest.json").read_text())["type"]["name"] == "bf16"
    result = run("export", "gguf", sources["llama"], "--out", out, "--type", "q4_0", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "of the largest, reported, not required), greedy equal" in result.stdout  # 4-bit logits: no tolerance


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def bad_input_root(tmp_path_factory, sources, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("gguf-bad-input")
    for arch in ("opt", "mistral"):  # OPT: no llama.cpp converter here; the tiny Mistral has a sliding window
        tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer.save_pretrained(root / arch)
    (root / "existing.gguf").write_bytes(b"the user's model")
    return root


BAD_INPUTS = [
    # (name, arguments after MODEL: "{root}" is the case's directory; the text the Error line must hold)
    ("q4_k-has-no-writer", ["{llama}", "--out", "{root}/m.gguf", "--type", "q4_k"],
     "--type q4_k: the installed gguf package 0.19.0 can read q4_k but not write it (gguf.quants has no Q4_K quantizer); "
     "types that work: f16, bf16, q8_0, q4_0"),
    ("unknown-type", ["{llama}", "--out", "{root}/m.gguf", "--type", "q3_k"],
     "unknown GGUF type 'q3_k' for --type; choose from f16, bf16, q8_0, q4_0"),
    ("existing-out", ["{llama}", "--out", "{root}/existing.gguf"],
     "--out {root}/existing.gguf exists (use --overwrite to replace it)"),
    ("not-gguf", ["{llama}", "--out", "{root}/model.bin"], "--out {root}/model.bin must end in .gguf"),
    ("architecture", ["{root}/opt", "--out", "{root}/m.gguf"],
     "GGUF export does not support the architecture 'opt'; supported: llama, mistral, qwen2"),
    ("sliding-window", ["{root}/mistral", "--out", "{root}/m.gguf"],
     "GGUF export of mistral with sliding-window attention (window 64) is not supported"),
]


@pytest.mark.parametrize("name, argv, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_error_line_and_writes_nothing(sources, bad_input_root, name, argv, message):
    before = snapshot(bad_input_root)
    source_before = snapshot(sources["llama"])
    argv = [arg.replace("{llama}", str(sources["llama"])).replace("{root}", str(bad_input_root)) for arg in argv]
    done = subprocess.run([sys.executable, "-m", "wanda_serve", "export", "gguf", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 1 and "Traceback" not in output, output
    assert len(errors) == 1 and message.replace("{root}", str(bad_input_root)) in errors[0], output
    assert snapshot(bad_input_root) == before and snapshot(sources["llama"]) == source_before


def test_without_llama_cpp_the_manifest_says_it_was_not_run(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if it were not installed
    manifest = export_gguf(GgufExport(tmp_path / "model.gguf", str(sources["llama"]), "q8_0"))
    assert manifest["checks"]["llama_cpp"] == {
        "ran": False, "why": "llama-cpp-python is not installed (make llama-cpp builds it from source)"}


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (make llama-cpp)")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_itself_runs_the_file_as_pytorch_runs_the_source(sources, tmp_path, arch):
    """llama.cpp's own loader and kernels, independent of transformers' GGUF reader: its logits on a prompt match the
    source's within f16's rounding (a wrong q/k layout or tensor name would not), and the export's own llama.cpp check
    agrees with the greedy continuation computed here."""
    from llama_cpp import Llama

    out = tmp_path / "model.gguf"
    manifest = export_gguf(GgufExport(out, str(sources[arch]), "f16"))
    tokenizer = AutoTokenizer.from_pretrained(sources[arch])
    ids = tokenizer(PROMPTS[0])["input_ids"]  # as the export's check tokenizes its first prompt
    llm = Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    llm.eval(ids)
    on_llama_cpp = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(sources[arch]).eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(on_llama_cpp - expected).max() <= 0.01 * np.abs(expected).max()

    check = manifest["checks"]["llama_cpp"]
    assert check["ran"] and check["version"] == importlib.metadata.version("llama-cpp-python")
    assert check["greedy"][0][0] == int(on_llama_cpp[-1].argmax())  # the continuation follows llama.cpp's logits
    assert [len(tokens) for tokens in check["greedy"]] == [32, 32]
    assert check["tokens_agreeing"] == tokens_agreeing(check["greedy"], manifest["checks"]["greedy"]["source"])
