"""A prune interrupted between blocks resumes from its checkpoint to the result of an uninterrupted run."""

import os
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_model
from wanda_serve.checkpoint import InterruptFlag, PruneCheckpoint, PruneInterrupted
from wanda_serve.cli import cli
from wanda_serve.engine import Owl, PruneOptions, Refine, prune_model
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import get_method
from wanda_serve.structure import Structure
from test_engine import batches

RECIPES = {
    "wanda, permutation, refinement": (get_method("wanda"), Structure(n=2, m=4), PruneOptions(permute=True, refine=Refine(steps=3, batch=2))),
    "sparsegpt in block order": (get_method("sparsegpt"), Structure(n=2, m=4), PruneOptions(block_order=True)),
    "wanda 50% with OWL": (get_method("wanda"), Structure(ratio=0.5), PruneOptions(owl=Owl())),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_interrupted_prune_resumes_to_the_uninterrupted_result(recipe, tmp_path):
    method, structure, options = RECIPES[recipe]
    whole = tiny_model("llama")
    whole_record = prune_model(whole, batches(), method, structure, options, progress=False)

    settings = {"recipe": recipe}
    first = PruneCheckpoint(tmp_path / "checkpoints", settings, every_seconds=3600, resume=False)
    first.interrupt.raised = True  # as a Ctrl-C during the first block: checkpoint after it, then stop
    with pytest.raises(PruneInterrupted, match=r"interrupted after block 1 of 2; checkpoint saved in .*--resume"):
        prune_model(tiny_model("llama"), batches(), method, structure, options, progress=False, checkpoint=first)

    resumed = tiny_model("llama")  # the dense model again, as a new process loads it
    record = prune_model(resumed, batches(), method, structure, options, progress=False,
                         checkpoint=PruneCheckpoint(tmp_path / "checkpoints", settings, every_seconds=3600, resume=True))
    for (name, expected), actual in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name
    assert (record.permutations, record.refined, record.stages, record.block_sparsity) == \
           (whole_record.permutations, whole_record.refined, whole_record.stages, whole_record.block_sparsity)


def test_a_checkpoint_is_taken_only_when_one_is_due(tmp_path):
    checkpoint = PruneCheckpoint(tmp_path / "checkpoints", {}, every_seconds=3600, resume=False)
    prune_model(tiny_model("llama"), batches(), get_method("wanda"), Structure(n=2, m=4), progress=False, checkpoint=checkpoint)
    assert not (tmp_path / "checkpoints").exists()  # a short prune leaves nothing behind
    every_block = PruneCheckpoint(tmp_path / "checkpoints", {}, every_seconds=1e-9, resume=False)
    prune_model(tiny_model("llama"), batches(), get_method("wanda"), Structure(n=2, m=4), progress=False, checkpoint=every_block)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "block-0.safetensors", "hidden-1.safetensors", "prune_job.json", "state.json"]  # none after the last block


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops():
    with InterruptFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def prune_args(model_dir, out, *extra):
    text = model_dir.parent / "text.txt"
    return ["prune", str(model_dir), "--out", str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--no-eval",
            "--refine", "2", *extra]


def test_cli_interrupt_leaves_no_output_and_resume_needs_the_same_options(tiny_model_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(cli, prune_args(tiny_model_dir, whole)).exit_code == 0

    out = tmp_path / "pruned"
    checkpoints = tmp_path / "pruned.checkpoints"
    with monkeypatch.context() as patch:  # Ctrl-C during the first block
        patch.setattr(InterruptFlag, "__enter__", lambda self: setattr(self, "raised", True) or self)
        patch.setattr(InterruptFlag, "__exit__", lambda self, *exc: None)
        result = runner.invoke(cli, prune_args(tiny_model_dir, out))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"Error: interrupted after block 1 of 2; checkpoint saved in {checkpoints}. "
                                                      "Run the same command with --resume to continue")
    assert not out.exists() and (checkpoints / "state.json").is_file()

    again = runner.invoke(cli, prune_args(tiny_model_dir, out))
    assert again.exit_code == 1 and f"Error: {checkpoints} holds a checkpoint of an earlier prune: add --resume" in again.output
    other = runner.invoke(cli, prune_args(tiny_model_dir, out, "--seed", "1", "--resume"))
    assert other.exit_code == 1 and "was made with other settings (refine, seed)" in other.output  # refinement draws with --seed too
    elsewhere = runner.invoke(cli, prune_args(tiny_model_dir, tmp_path / "elsewhere", "--resume"))
    assert elsewhere.exit_code == 1 and "--resume: no checkpoint in" in elsewhere.output

    resumed = runner.invoke(cli, prune_args(tiny_model_dir, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert not checkpoints.exists()  # done: nothing left to resume
    expected, actual = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("damaged", ["block-0.safetensors", "hidden-1.safetensors"])
def test_a_damaged_checkpoint_is_refused_with_one_message(damaged, tmp_path):
    """A checkpoint cut short (a full disk, a kill while writing) must stop --resume with the fix, not a traceback."""
    method, structure = get_method("wanda"), Structure(n=2, m=4)
    first = PruneCheckpoint(tmp_path / "checkpoints", {}, every_seconds=3600, resume=False)
    first.interrupt.raised = True
    with pytest.raises(PruneInterrupted):
        prune_model(tiny_model("llama"), batches(), method, structure, progress=False, checkpoint=first)
    path = tmp_path / "checkpoints" / damaged
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WandaServeError, match=r"--resume: the checkpoint in .* is damaged .*remove the directory"):
        prune_model(tiny_model("llama"), batches(), method, structure, progress=False,
                    checkpoint=PruneCheckpoint(tmp_path / "checkpoints", {}, every_seconds=3600, resume=True))
