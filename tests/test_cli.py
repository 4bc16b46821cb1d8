import dataclasses
import errno
import json
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, T5Config

from deploy.vllm_server import ServerFailed, ServerSettings
from deploy.workload import WorkloadSpec
from wanda_serve.cli import cli, server_options
from wanda_serve.contract import MANIFEST_NAME
from wanda_serve.engine import Refine, block_linears
from wanda_serve.cli_options import RECIPES
from wanda_serve.pipeline import EDGE_EXPORTS
from wanda_serve.structure import audit_linears


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def small_prune_args(model_dir, out, *extra):
    text = model_dir.parent / "text.txt"
    return ["prune", model_dir, "--out", out, "--calib", text, "--eval-data", text, "--nsamples", 4, "--seqlen", 32,
            "--eval-seqlen", 64, "--eval-windows", 2, *extra]


def test_prune_writes_a_loadable_model_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = run(*small_prune_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}  (wanda + permutation 2:4, sparsity 0.5000)" in result.output  # the default recipe
    assert {"config.json", "model.safetensors", "tokenizer.json", "prune_report.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no temporary leftovers

    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "wanda" and report["structure"] == "2:4"
    assert set(report["permutation"]["layers"]) == {"0.mlp.down_proj", "1.mlp.down_proj"}
    assert report["calibration"] == {"used": True, "source": str(tiny_model_dir.parent / "text.txt"), "nsamples": 4,
                                     "seqlen": 32, "seed": 0, "tokens": 128}
    assert report["sparsity"]["all_nm_valid"]["2:4"] and len(report["sparsity"]["layers"]) == 14
    assert report["mask_seconds"] > 0 and report["forward_seconds"] > 0 and report["memory"]["peak_rss_mib"] > 0
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    assert dense["windows"] == pruned["windows"] == 2 and dense["perplexity"] != pruned["perplexity"]
    assert report["versions"]["torch"] == torch.__version__

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert audit_linears(block_linears(reloaded))["all_nm_valid"]["2:4"]

    evaluated = tmp_path / "eval.json"
    result = run("eval", out, "--data", tiny_model_dir.parent / "text.txt", "--eval-seqlen", 64, "--eval-windows", 2,
                 "--json", evaluated)
    assert result.exit_code == 0, result.output
    assert "all 2:4 valid: yes" in result.output
    assert json.loads(evaluated.read_text())["perplexity"]["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-5)


def test_permutation_is_on_by_default_only_where_the_benchmark_says_it_helps(tiny_model_dir, tmp_path):
    reports = {}
    for name, extra in {"wanda-off": ["--no-permute"], "magnitude": ["--method", "magnitude"],
                        "ria-50": ["--method", "ria", "--structure", "0.5"], "sparsegpt": ["--method", "sparsegpt"]}.items():
        result = run(*small_prune_args(tiny_model_dir, tmp_path / name, "--no-eval", *extra))
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name / "prune_report.json").read_text())
    assert all(report["permutation"] is None for report in reports.values())
    assert reports["magnitude"]["calibration"] == {"used": False}  # magnitude needs no calibration, and gets none
    result = run(*small_prune_args(tiny_model_dir, tmp_path / "bad", "--no-eval", "--permute", "--structure", "0.5"))
    assert result.exit_code == 1 and "0.5 is not N:M" in result.output


def test_overwrite_replaces_an_existing_output(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run(*small_prune_args(tiny_model_dir, out, "--method", "magnitude", "--structure", "0.5", "--no-eval", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert json.loads((out / "prune_report.json").read_text())["calibration"] == {"used": False}


def assert_one_error_line(result, expected):
    # CliRunner keeps a traceback out of the output, so check what ended the command: click's exit, not a crash.
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exc_info
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {expected}"], result.output


def test_missing_model_path(tmp_path):
    assert_one_error_line(run("prune", "./no/such/model", "--out", tmp_path / "o"), "no such path: ./no/such/model")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_error_line(run("eval", tmp_path / "empty"), f"{tmp_path / 'empty'} is not a model directory: it has no config.json")


def test_unsupported_architecture(tmp_path):
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path / "t5")
    assert_one_error_line(
        run("prune", tmp_path / "t5", "--out", tmp_path / "o"),
        f"unsupported architecture 't5' in {tmp_path / 't5'}: wanda-serve prunes decoder-only causal LMs",
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("structure, expected", [
    ("1.5", "sparsity ratio must be in (0, 1), got 1.5"),
    ("0", "sparsity ratio must be in (0, 1), got 0.0"),
    ("4:4", "invalid N:M 4:4: need 0 < N < M"),
    ("6:4", "invalid N:M 6:4: need 0 < N < M"),
])
def test_bad_structure_fails_at_the_option(tiny_model_dir, tmp_path, structure, expected):
    out = tmp_path / "pruned"
    result = run(*small_prune_args(tiny_model_dir, out, "--structure", structure))
    assert result.exit_code == 2 and result.output.splitlines()[-1] == f"Error: Invalid value for '--structure': {expected}", result.output
    assert not out.exists()


def test_structure_that_does_not_fit_the_model(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    assert_one_error_line(run(*small_prune_args(tiny_model_dir, out, "--structure", "2:7")),
                          "N:M 2:7 does not fit 0.self_attn.q_proj: M=7 does not divide its 64 inputs")
    assert not out.exists()


def test_calibration_text_too_short(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    result = run("prune", tiny_model_dir, "--out", tmp_path / "o", "--calib", short, "--seqlen", 64, "--no-eval")
    assert_one_error_line(result, f"calibration text {short} is too short: 22 tokens, windows need 64")
    assert not (tmp_path / "o").exists()


def test_missing_calibration_file(tiny_model_dir, tmp_path):
    result = run("prune", tiny_model_dir, "--out", tmp_path / "o", "--calib", tmp_path / "nope.txt", "--seqlen", "16", "--no-eval")
    assert_one_error_line(result, f"no such text file: {tmp_path / 'nope.txt'} (or use wiki, news, c4, wikitext2)")


def test_non_empty_output_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_error_line(run(*small_prune_args(tiny_model_dir, out)),
                          f"output directory {out} exists and is not empty (use --overwrite to replace it)")
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_prune_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("wanda_serve.jobs.prune_model", interrupted)
    out = tmp_path / "pruned"
    assert_one_error_line(run(*small_prune_args(tiny_model_dir, out, "--no-eval")), "interrupted; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_unknown_device(tiny_model_dir, tmp_path):
    assert_one_error_line(run(*small_prune_args(tiny_model_dir, tmp_path / "o", "--device", "tpu")),
                          "unknown device 'tpu': use cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so(tiny_model_dir, tmp_path):
    assert_one_error_line(run(*small_prune_args(tiny_model_dir, tmp_path / "o", "--device", "cuda")),
                          f"device cuda requested but CUDA is not available to this torch ({torch.__version__})")


def test_main_job_with_a_missing_model_fails_in_its_first_stage_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    result = run("run", tmp_path / "missing", "--out", out)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exc_info
    assert result.output.startswith("Error: stage prune: no such path") and "(nothing was written)" in result.output
    assert not out.exists()


def test_main_job_refuses_bad_benchmark_settings_before_pruning(tmp_path):
    result = run("run", "--out", tmp_path / "run", "--rounds", "0")
    assert result.exit_code == 2 and "Error: Invalid value for '--rounds': 0 is not in the range x>=1." in result.output
    assert not (tmp_path / "run").exists()


def test_main_job_failing_late_keeps_the_previous_run(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "REPORT.md").write_text("the previous run")
    # No vLLM: the exports skip their vLLM check, and the bench stage fails after all the others finished.
    monkeypatch.setenv("WANDA_SERVE_VLLM_PYTHON", str(tmp_path / "no-python"))
    result = run("run", tiny_model_dir, "--out", out, "--overwrite", "--nsamples", 2, "--seqlen", 16, "--recover-tokens", 512, "--eval-seqlen", 32,
                 "--eval-windows", 1)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exc_info
    assert "\nError: stage bench: vLLM is not installed" in result.output
    assert f"(nothing was written; the previous run in {out} is unchanged)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "text.txt", "tiny-llama"]  # no .partial, no .old
    assert [p.name for p in out.iterdir()] == ["REPORT.md"] and (out / "REPORT.md").read_text() == "the previous run"


def test_main_job_makes_the_chosen_edge_exports_and_keeps_them_when_a_later_stage_fails(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDA_SERVE_VLLM_PYTHON", str(tmp_path / "no-python"))  # the bench stage fails after the exports
    result = run("run", tiny_model_dir, "--out", out, "--nsamples", 2, "--seqlen", 16, "--no-recover", "--eval-seqlen", 32,
                 "--eval-windows", 1, "--export", "gguf,ort-genai,onnx")
    assert "\nError: stage bench: vLLM is not installed" in result.output and f"(finished stages are kept in {out})" in result.output
    manifests = {"onnx": out / "onnx-pruned" / MANIFEST_NAME, "ort-genai": out / "ort-genai-pruned" / MANIFEST_NAME,
                 "gguf": out / "pruned.gguf.manifest.json"}
    manifests = {name: json.loads(path.read_text()) for name, path in manifests.items()}
    for name, manifest in manifests.items():
        assert EDGE_EXPORTS[name].result(manifest), name  # the report's row reads every field it shows
    gguf_zeros = manifests["gguf"]["checks"]["zeros"]
    assert (out / "pruned.gguf").is_file() and gguf_zeros["zeros_kept"] == gguf_zeros["source_zeros"] > 0
    assert manifests["ort-genai"]["zeros"]["pruned_not_zero"] == 0 and manifests["ort-genai"]["builder"]["precision"] == "int4"
    unknown = run("run", "--out", tmp_path / "other", "--export", "onnx,tflite")
    assert unknown.exit_code == 2 and "Invalid value for '--export'" in unknown.output and "onnx, ort-genai, gguf" in unknown.output
    assert not (tmp_path / "other").exists()


def test_a_full_disk_is_one_error_line_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    def full_disk(loaded, out, max_shard_size=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr("wanda_serve.jobs.save_model", full_disk)
    out = tmp_path / "pruned"
    result = run(*small_prune_args(tiny_model_dir, out, "--no-eval"))
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exc_info
    error = result.output.splitlines()[-1]
    assert error.startswith("Error: No space left on device: ") and error.endswith("model.safetensors (nothing was written)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_alps_with_block_order_and_refinement_reports_what_it_did(tiny_model_dir, tmp_path):
    out = tmp_path / "alps"
    result = run(*small_prune_args(tiny_model_dir, out, "--no-eval", "--method", "alps", "--block-order", "--refine", 3))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}  (alps + block order + refine 3 2:4, sparsity 0.5000)" in result.output
    report = json.loads((out / "prune_report.json").read_text())
    assert report["block_order"]["stages"] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                                               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert report["refine"]["steps"] == 3 and [b["block"] for b in report["refine"]["blocks"]] == [0, 1]
    assert report["sparsity"]["all_nm_valid"]["2:4"]


def test_a_recipe_is_its_options_spelled_out_and_refuses_them_given_too(tiny_model_dir, tmp_path, monkeypatch):
    spelled_out = {"fast": ["--method", "wanda"], "best": ["--method", "sparsegpt", "--no-permute", "--refine", "10"]}
    assert set(spelled_out) == set(RECIPES)
    for name, options in spelled_out.items():
        by_name, by_options = tmp_path / f"{name}-recipe", tmp_path / f"{name}-options"
        for out, extra in ((by_name, ["--recipe", name]), (by_options, options)):
            result = run(*small_prune_args(tiny_model_dir, out, "--no-eval", *extra))
            assert result.exit_code == 0, result.output
        assert (by_name / "model.safetensors").read_bytes() == (by_options / "model.safetensors").read_bytes(), name
    best = json.loads((tmp_path / "best-recipe" / "prune_report.json").read_text())
    assert best["method"] == "sparsegpt" and best["refine"]["steps"] == 10
    for given, flags in ((["--method", "wanda"], "--method"), (["--permute"], "--permute/--no-permute"),
                         (["--refine", 2, "--block-order"], "--block-order/--one-pass, --refine")):
        result = run(*small_prune_args(tiny_model_dir, tmp_path / "both", "--no-eval", "--recipe", "best", *given))
        assert result.exit_code == 1 and result.output.splitlines()[-1] == (
            f"Error: --recipe best chooses {flags}: give either the recipe or the options"), result.output
    assert not (tmp_path / "both").exists()
    # The main job: the recipe reaches the prune stage it runs.
    given = stop_at(monkeypatch, "wanda_serve.cli.run_main_job")
    run("run", tiny_model_dir, "--recipe", "best", "--out", tmp_path / "run")
    (job,), = given
    assert (job.prune.method, job.prune.permute, job.prune.reconstruct, job.prune.block_order, job.prune.refine) == (
        "sparsegpt", False, False, False, Refine(10))
    result = run("run", tiny_model_dir, "--recipe", "fast", "--method", "sparsegpt", "--out", tmp_path / "run")
    assert result.exit_code == 1 and result.output.splitlines()[-1] == (
        "Error: --recipe fast chooses --method: give either the recipe or the options")


def stop_at(monkeypatch, target: str) -> list:
    """Replace the function `target` (module.name) with one that records what it was given and stops the command."""
    given = []

    def stop(*args):
        given.append(args)
        raise ServerFailed("stopped by the test")

    monkeypatch.setattr(target, stop)
    return given


def test_server_and_prompt_options_are_the_settings_fields_with_their_defaults(tiny_model_dir, tmp_path, monkeypatch):
    assert set(server_options.table) == {item.name for item in dataclasses.fields(ServerSettings)} - {"sparse_runtime"}
    jobs = stop_at(monkeypatch, "wanda_serve.cli.run_main_job")
    assert_one_error_line(run("run", "--out", tmp_path / "run"), "stopped by the test")
    assert_one_error_line(run("run", "--out", tmp_path / "run", "--serve-dtype", "float16", "--export-dtype", "float32",
                              "--vllm-args", "--seed 1", "--startup-timeout", 5, "--num-prompts", 3, "--prompts", "random"),
                          "stopped by the test")
    (default,), (chosen,) = jobs
    assert default.bench.server == ServerSettings() and default.bench.workload == WorkloadSpec() and default.export_dtype == "bfloat16"
    assert (chosen.bench.server.dtype, chosen.export_dtype, chosen.bench.server.extra_args, chosen.bench.server.startup_timeout_s) == (
        "float16", "float32", ("--seed", "1"), 5.0)
    assert (chosen.bench.workload.num_prompts, chosen.bench.workload.source) == (3, "random")


def test_renamed_options_keep_their_old_spellings_hidden(tiny_model_dir, tmp_path, monkeypatch):
    jobs = stop_at(monkeypatch, "wanda_serve.cli.run_bench")
    servers = stop_at(monkeypatch, "wanda_serve.cli.VllmServer")
    for pruned, dtype in (("--pruned", "--serve-dtype"), ("--sparse", "--dtype")):
        assert_one_error_line(run("bench", "--dense", tiny_model_dir, pruned, tmp_path / "p", dtype, "half", "--out", tmp_path / "b"),
                              "stopped by the test")
        assert_one_error_line(run("serve", tiny_model_dir, dtype, "half", "--run-dir", tmp_path), "stopped by the test")
    assert [(job.pruned, job.settings.server.dtype) for (job,) in jobs] == [(str(tmp_path / "p"), "half")] * 2
    assert [settings.dtype for _, _, settings, *_ in servers] == ["half"] * 2

    for command in ("bench", "serve", "run"):
        shown = run(command, "--help").output
        assert "--serve-dtype TEXT" in shown and not re.search("--sparse(?!-)|--dtype(?!:)", shown), shown
    assert "--pruned TEXT" in run("bench", "--help").output
    missing = run("bench", "--dense", tiny_model_dir, "--out", tmp_path / "b")
    assert missing.exit_code == 2 and missing.output.splitlines()[-1] == "Error: Missing option '--pruned'."
