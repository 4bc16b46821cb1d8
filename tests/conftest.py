"""Tiny randomly initialised decoder models of several architectures, a tiny tokenizer, and the fake vLLM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from wanda_serve.cli import cli

# A shell that starts the tests in the background (`make test &`) has them ignore SIGINT, and every
# process they start inherits that; the tests that press Ctrl-C need it delivered as a terminal would.
signal.signal(signal.SIGINT, signal.default_int_handler)

VOCAB = 320  # model vocabulary; the tokenizer below has 300 tokens (256 bytes, 3 specials, merges)
TEXT = " ".join(
    f"The {animal} number {i} walked {distance} miles to see the {place} before dinner."
    for i in range(400)
    for animal, distance, place in [(["cat", "dog", "fox", "owl"][i % 4], i % 7 + 1, ["river", "hill", "town"][i % 3])]
)

CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=64,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
    ),
    # Sliding-window and full-attention layers, each with its own mask and rotary embeddings (theta 1e4 and 1e6).
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
}
ARCHITECTURES = list(CONFIGS)

# Prepended to the code peak_memory_above_start runs: status() reads /proc/self/status; start_peak() takes what
# the process holds as the baseline and restarts the peak (VmHWM) from there; report_peak() prints the rise.
PEAK_PRELUDE = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start_peak():
        global BEFORE
        BEFORE = status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as e:
            print(json.dumps({"skip": f"cannot restart the peak RSS: {e}"}))
            sys.exit()

    def report_peak():
        print(json.dumps({"above": status("VmHWM") - BEFORE}))
""")


def peak_memory_above_start(code: str, *args: str) -> int:
    """Bytes the peak RSS of `code`, run in a fresh Python with `args`, rose above what it held at start_peak().
    A fixed mmap threshold: freed tensors go back to the system, so the peak is what was alive at once."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to restart the peak")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", PEAK_PRELUDE + textwrap.dedent(code), *args],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["above"]


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def pruned_model_dir(path: Path, arch: str, tokenizer, model=None) -> Path:
    """A tiny `arch` model (or `model`, one already made) pruned to 2:4 with Wanda on random ids, saved with `tokenizer`."""
    from wanda_serve.engine import prune_model
    from wanda_serve.methods import get_method
    from wanda_serve.structure import Structure

    model = model if model is not None else tiny_model(arch)
    calibration = [torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))]
    prune_model(model, calibration, get_method("wanda"), Structure(n=2, m=4), progress=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny LLaMA with its tokenizer, and a text file to calibrate and evaluate on."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "text.txt").write_text(TEXT)
    return path


@pytest.fixture
def pruned(tiny_model_dir, tmp_path):
    """tiny_model_dir pruned by the CLI with its defaults (Wanda + permutation, 2:4)."""
    out = tmp_path / "pruned"
    text = tmp_path / "text.txt"
    result = CliRunner().invoke(cli, ["prune", str(tiny_model_dir), "--out", str(out), "--calib", str(text), "--nsamples", "4",
                                      "--seqlen", "32", "--no-eval"])
    assert result.exit_code == 0, result.output
    return out


FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """Point the launcher at the fake vLLM; returns a function that sets its environment (mode, recording, failures)."""
    python = tmp_path / "fake-python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("WANDA_SERVE_VLLM_PYTHON", str(python))

    def configure(**env):
        for key, value in env.items():
            monkeypatch.setenv(f"FAKE_VLLM_{key.upper()}", str(value))

    configure(mode="serve")
    return configure


@pytest.fixture
def leftovers():
    """Takes the process groups a test starts; what a failing test leaves running of them is killed."""
    groups: list[int] = []
    yield groups.append
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
