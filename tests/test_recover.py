"""Recovery by distillation on tiny models: it learns, keeps the mask exactly, resumes, and refuses bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEXT, pruned_model_dir, tiny_model
from wanda_serve.cli import cli
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.jobs import PruneJob, run_prune
from wanda_serve.recover import KeepMask, RecoverJob, RecoveryInterrupted, StopOnInterrupt, distillation_loss, run_recover
from wanda_serve.structure import audit_linears

WANDA_SERVE = str(Path(sys.executable).with_name("wanda-serve"))


def job(pruned: Path, out: Path, **changes) -> RecoverJob:
    text = str(pruned.parent / "text.txt")
    settings = dict(out=out, pruned=str(pruned), tokens=1024, seqlen=64, batch_size=2, lr=1e-3, data=text, checkpoint_every=2,
                    evaluation=None, progress=False)
    return RecoverJob(**(settings | changes))


def kl_to_teacher(model_dir: Path, teacher_dir: Path) -> float:
    ids = AutoTokenizer.from_pretrained(teacher_dir)(TEXT[-4000:], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        student = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)(input_ids=ids)
    return float(distillation_loss(student, teacher, 1.0, 0.0))


def zeros(model_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: linear.weight == 0 for name, linear in block_linears(model).items()}


def test_recovery_lowers_the_kl_and_keeps_every_zero(pruned, tiny_model_dir, tmp_path):
    report = run_recover(job(pruned, tmp_path / "rec", tokens=4096))
    assert kl_to_teacher(tmp_path / "rec", tiny_model_dir) < 0.8 * kl_to_teacher(pruned, tiny_model_dir)
    before, after = zeros(pruned), zeros(tmp_path / "rec")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert report["mask_check"]["passed"] and report["mask_check"]["nm_valid_after"]["2:4"]
    assert report["teacher"] == str(tiny_model_dir)  # from the prune report
    assert report["steps"] == 32 and report["tokens"] == 4096 and len(report["loss_curve"]) == 32
    assert not (tmp_path / "rec.checkpoints").exists()


def test_a_teacher_the_prune_named_by_a_relative_path_is_found_from_elsewhere(tiny_model_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    run_prune(PruneJob(out=Path("pruned"), model="dense", calib="text.txt", nsamples=2, seqlen=16, progress=False))
    monkeypatch.chdir(tmp_path / "pruned")
    assert run_recover(job(tmp_path / "pruned", tmp_path / "rec"))["teacher"] == str(tmp_path / "dense")


def test_the_mask_holds_after_every_step(pruned, tmp_path, monkeypatch):
    audits = []
    keep = KeepMask.on_optimizer_step

    def checked(self, args, state, control, **kwargs):
        keep(self, args, state, control, **kwargs)
        weights = {str(i): torch.nn.Linear(1, 1) for i in range(len(self.kept))}
        for linear, (weight, kept) in zip(weights.values(), self.kept.items()):
            linear.weight = torch.nn.Parameter(weight.detach().clone())
            assert torch.equal(weight.detach() == 0, ~kept)  # zero exactly where pruned, nowhere else
        audits.append(audit_linears(weights)["all_nm_valid"]["2:4"])

    monkeypatch.setattr(KeepMask, "on_optimizer_step", checked)
    run_recover(job(pruned, tmp_path / "rec"))
    assert audits == [True] * 8


def test_without_the_mask_callback_the_final_check_fails(pruned, tmp_path, monkeypatch):
    monkeypatch.setattr(KeepMask, "on_train_begin", lambda *a, **k: None)
    monkeypatch.setattr(KeepMask, "on_optimizer_step", lambda *a, **k: None)
    monkeypatch.setattr(KeepMask, "on_train_end", lambda *a, **k: None)
    with pytest.raises(WandaServeError, match="recovery changed the sparsity mask"):
        run_recover(job(pruned, tmp_path / "rec"))
    assert not (tmp_path / "rec").exists()


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(pruned, tmp_path, monkeypatch):
    run_recover(job(pruned, tmp_path / "straight"))

    stop_at_step = StopOnInterrupt.on_step_end

    def ctrl_c_at_step_4(self, args, state, control, **kwargs):
        self.interrupt.raised = self.interrupt.raised or state.global_step == 4
        stop_at_step(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnInterrupt, "on_step_end", ctrl_c_at_step_4)
    with pytest.raises(RecoveryInterrupted, match="interrupted at step 4 of 8; checkpoint saved in .*--resume"):
        run_recover(job(pruned, tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoints" / "checkpoint-4").is_dir()
    monkeypatch.setattr(StopOnInterrupt, "on_step_end", stop_at_step)

    with pytest.raises(WandaServeError, match="holds checkpoints of an earlier run: add --resume"):
        run_recover(job(pruned, tmp_path / "resumed"))
    with pytest.raises(WandaServeError, match=r"made with other settings \(lr\)"):
        run_recover(job(pruned, tmp_path / "resumed", resume=True, lr=5e-4))
    report = run_recover(job(pruned, tmp_path / "resumed", resume=True))
    assert report["steps"] == 8 and report["resumed_from"].endswith("checkpoint-4") and len(report["loss_curve"]) == 8
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.allclose(straight[k], resumed[k], rtol=0, atol=1e-6) for k in straight)


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_damaged_checkpoint_is_refused_before_training(pruned, tmp_path, monkeypatch, damaged):
    stop_at_step = StopOnInterrupt.on_step_end

    def ctrl_c_at_step_4(self, args, state, control, **kwargs):
        self.interrupt.raised = self.interrupt.raised or state.global_step == 4
        stop_at_step(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnInterrupt, "on_step_end", ctrl_c_at_step_4)
    with pytest.raises(RecoveryInterrupted):
        run_recover(job(pruned, tmp_path / "rec"))
    monkeypatch.setattr(StopOnInterrupt, "on_step_end", stop_at_step)
    path = tmp_path / "rec.checkpoints" / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a save killed halfway
    with pytest.raises(WandaServeError, match=f"--resume: the checkpoint in .*rec.checkpoints is damaged \\({damaged}: .*remove the"):
        run_recover(job(pruned, tmp_path / "rec", resume=True))
    assert not (tmp_path / "rec").exists()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(pruned, tmp_path):
    out = tmp_path / "rec"
    argv = [WANDA_SERVE, "recover", str(pruned), "--out", str(out), "--tokens", "200000", "--seqlen", "64", "--batch-size", "2",
            "--data", str(tmp_path / "text.txt"), "--no-eval", "--checkpoint-every", "100000"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = ""
    while "recover:" not in seen:  # the progress bar: training has started
        chunk = process.stderr.read(1)
        assert chunk, "the command ended before training started"
        seen += chunk
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    errors = [line.split("Error: ", 1)[1] for line in (seen + stderr).replace("\r", "\n").splitlines() if "Error: " in line]
    assert process.returncode == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith("interrupted at step ") and "--resume" in errors[0]
    assert not out.exists() and list((tmp_path / "rec.checkpoints").glob("checkpoint-*"))


def embeddings_and_head(model_dir: Path) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return [model.get_input_embeddings().weight, model.get_output_embeddings().weight]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # embeddings tied to the output head, and not
def test_the_embeddings_keep_the_teachers_values_unless_trained(arch, tmp_path, tiny_tokenizer):
    teacher = tmp_path / "dense"
    tiny_model(arch).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    pruned = pruned_model_dir(tmp_path / "pruned", arch, tiny_tokenizer)
    (tmp_path / "text.txt").write_text(TEXT)
    # Gradient checkpointing: the blocks must still get gradients when their input (the embeddings) needs none.
    frozen = run_recover(job(pruned, tmp_path / "frozen", teacher=str(teacher), tokens=256, gradient_checkpointing=True))
    result = CliRunner().invoke(cli, ["recover", str(pruned), "--out", str(tmp_path / "trained"), "--teacher", str(teacher),
                                      "--data", str(tmp_path / "text.txt"), "--tokens", "256", "--seqlen", "64", "--batch-size", "2",
                                      "--lr", "1e-3", "--no-eval", "--train-embeddings"])
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "trained" / "recover_report.json").read_text())

    before = embeddings_and_head(pruned)
    assert all(torch.equal(a, b) for a, b in zip(before, embeddings_and_head(tmp_path / "frozen")))
    assert not any(torch.equal(a, b) for a, b in zip(before, embeddings_and_head(tmp_path / "trained")))
    blocks_before, blocks_after = block_linears(AutoModelForCausalLM.from_pretrained(pruned)), block_linears(
        AutoModelForCausalLM.from_pretrained(tmp_path / "frozen"))
    assert not any(torch.equal(blocks_before[name].weight, blocks_after[name].weight) for name in blocks_before)
    embedding_parameters = sum(w.numel() for w in {id(w): w for w in before}.values())  # one tensor where tied
    assert trained["trained_parameters"] - frozen["trained_parameters"] == embedding_parameters
    assert (trained["settings"]["train_embeddings"], frozen["settings"]["train_embeddings"]) == (True, False)


@pytest.mark.parametrize("teacher_arch, expected", [("opt", "is a opt model"), ("vocab", "another vocabulary")])
def test_a_teacher_that_does_not_match_is_refused(pruned, tmp_path, tiny_tokenizer, teacher_arch, expected):
    teacher = tmp_path / "teacher"
    model = tiny_model("opt") if teacher_arch == "opt" else tiny_model("llama")
    if teacher_arch == "vocab":
        model.resize_token_embeddings(400)
    model.save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    with pytest.raises(WandaServeError, match=expected):
        run_recover(job(pruned, tmp_path / "rec", teacher=str(teacher)))
    assert not (tmp_path / "rec").exists() and not (tmp_path / "rec.checkpoints").exists()


def test_a_dense_model_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(WandaServeError, match="has no pruned weights"):
        run_recover(job(tiny_model_dir, tmp_path / "rec", teacher=str(tiny_model_dir)))


def test_bad_budget_is_refused_at_the_option(pruned, tmp_path):
    result = CliRunner().invoke(cli, ["recover", str(pruned), "--out", str(tmp_path / "rec"), "--tokens", "0"])
    assert result.exit_code == 2 and "Invalid value for '--tokens'" in result.output
    with pytest.raises(WandaServeError, match="less than one sample"):
        job(pruned, tmp_path / "rec", tokens=10)


def test_torchrun_trains_data_parallel_and_only_the_first_process_writes(pruned, tmp_path):
    """Two processes on the CPU (gloo), as a user with two GPUs would launch it; each sees half of every batch."""
    out = tmp_path / "rec-ddp"
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "wanda_serve", "recover", str(pruned),
               "--out", str(out), "--data", str(tmp_path / "text.txt"), "--tokens", "1024", "--seqlen", "64", "--batch-size", "4",
               "--lr", "1e-3", "--no-eval"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(f"wrote {out}") == 1  # the first process reports; the other returns quietly
    report = json.loads((out / "recover_report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4 and report["mask_check"]["passed"]
    before, after = zeros(pruned), zeros(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not (tmp_path / "rec-ddp.checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rec-ddp")) == []


def test_a_batch_that_does_not_split_over_the_processes_is_refused(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(WandaServeError, match="--batch-size 4 is the batch of all 3 processes together: give a multiple of 3"):
        run_recover(job(pruned, tmp_path / "rec", batch_size=4))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(WandaServeError, match="FSDP and DeepSpeed shard"):
        run_recover(job(pruned, tmp_path / "rec"))


def test_adam_beta2_reaches_the_optimizer(pruned, tmp_path, monkeypatch):
    betas = []
    original = torch.optim.AdamW.__init__

    def init(self, params, *args, **kwargs):
        betas.append(kwargs.get("betas"))
        original(self, params, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init)
    run_recover(job(pruned, tmp_path / "rec", tokens=128, adam_beta2=0.95))
    assert betas == [(0.9, 0.95)]
    with pytest.raises(WandaServeError, match="--adam-beta2 must lie between 0 and 1"):
        job(pruned, tmp_path / "bad", adam_beta2=1.0)
