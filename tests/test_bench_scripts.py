"""The benchmark scripts' bookkeeping: recipes spelled out, --resume refusing results measured otherwise, masks compared."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import prune_methods  # noqa: E402
from determinism import mask_difference  # noqa: E402
from prune_methods import NUMERIC_SOURCES, PACKAGE_DIR, RECIPES, Recipe, Settings, code_version, stored_result  # noqa: E402


def test_every_recipe_spells_out_its_permutation_block_order_refinement_and_the_shared_settings():
    for recipe in RECIPES:
        options = Settings().prune_options(recipe)
        assert ("--permute" in options) != ("--no-permute" in options), recipe.name
        assert ("--block-order" in options) != ("--one-pass" in options), recipe.name
        assert sum(option.startswith("--refine") for option in options) == 1, recipe.name
        for option in ("--method", "--structure", "--calib", "--nsamples", "--seqlen", "--seed", "--batch-size", "--dtype", "--device"):
            assert options[option], (recipe.name, option)
    assert len({recipe.name for recipe in RECIPES}) == len(RECIPES)


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


def test_resume_refuses_a_result_measured_with_other_options(tmp_path):
    path = stored(tmp_path, RECIPE, Settings(nsamples=16), PROVENANCE)
    with pytest.raises(SystemExit) as refused:
        stored_result(path, RECIPE.name, expected(Settings()), recompute_stale=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"error: --resume: the stored result of wanda-2of4-permute ({path}) was measured otherwise: "
                              "prune --nsamples: stored 16, now 64. Use --recompute-stale")


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
    assert "measuring wanda-2of4-permute again: cpu_capability: stored AVX2, now AVX512" in capsys.readouterr().out


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
    stored_dense = tmp_path / "dense.json"
    stored_dense.write_text(json.dumps({"name": "dense", "options": settings.recorded_options(None), "provenance": now, "eval": {}}))
    stored(tmp_path, RECIPES[0], Settings(seqlen=256), now)
    measured = []
    monkeypatch.setattr(prune_methods, "measure", lambda recipe, *args: measured.append(recipe))
    monkeypatch.setattr(sys, "argv", ["prune_methods.py", "--resume", "--work", str(tmp_path), "--out", str(tmp_path / "out.md")])
    with pytest.raises(SystemExit, match=f"stored result of {RECIPES[0].name} .*prune --seqlen: stored 256, now 512"):
        prune_methods.main()
    assert measured == []  # the dense result matched and was reused


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
