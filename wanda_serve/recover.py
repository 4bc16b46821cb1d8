"""Recovery: distil a pruned model back toward its dense teacher, with the sparsity mask kept exactly.

Built on transformers' Trainer: the distillation loss is its `compute_loss`, the mask is a callback,
and checkpoints, resume, the learning-rate schedule and data-parallel training (`torchrun` or
`accelerate launch`, one process per device) come with it. TRL's distillation trainers (GKD) generate from the student on-policy, which costs far
more per token than this offline KL on fixed text, so they are not used.

The mask is the set of weights that are zero in the pruned model's block linears. Their gradients are
zeroed by a hook, so optimizer state never builds up for them, and the weights are multiplied by the
mask after every optimizer step, so weight decay or rounding cannot revive them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from wanda_serve.artifacts import atomic_output_dir, check_output_dir, package_versions, read_json_file
from wanda_serve.checkpoint import InterruptFlag, checkpoint_dir, damaged_checkpoint
from wanda_serve.contract import PRUNE_REPORT_NAME, RECOVER_REPORT_NAME, EvalOptions
from wanda_serve.data import EMBEDDED_NEWS, EMBEDDED_TEXT, Corpus, calibration_batches, load_corpus
from wanda_serve.engine import block_linears
from wanda_serve.errors import WandaServeError
from wanda_serve.jobs import Evaluation, peak_memory, resolve_device
from wanda_serve.models import check_context, load_model, save_model
from wanda_serve.structure import KeptZeros, audit_linears


JOB_NAME = "recover_job.json"  # in the checkpoint directory: what a --resume must match


@dataclass
class RecoverJob:
    out: Path
    pruned: str
    teacher: str | None = None  # None: the model the prune report names
    tokens: int = 50_000  # training budget: samples of `seqlen` tokens until this many are seen
    seqlen: int = 256
    batch_size: int = 4
    lr: float = 3e-4  # peak, after a linear warm-up, then cosine decay to 0
    warmup: float = 0.05  # share of the steps
    adam_beta2: float = 0.999  # AdamW's second-moment decay (transformers' default)
    temperature: float = 1.0  # of both distributions in the KL
    hidden_weight: float = 0.0  # weight of the per-layer hidden-state term (SquareHead); 0: logits only
    train_embeddings: bool = False  # False: the token embeddings and the output head keep the teacher's values
    data: str = EMBEDDED_TEXT  # its calibration region; never the evaluation region
    device: str = "cpu"
    dtype: str = "float32"  # bfloat16: autocast; the weights and the optimizer stay in float32
    seed: int = 0
    checkpoint_every: int = 50  # steps
    resume: bool = False
    gradient_checkpointing: bool = False
    evaluation: EvalOptions | None = field(default_factory=EvalOptions)  # in domain; None: no perplexity
    out_of_domain: str | None = EMBEDDED_NEWS  # a second evaluation text; None: skip it
    reference: bool = True  # also measure the teacher and the un-recovered model (a caller that has them skips it)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.seqlen < 2:
            raise WandaServeError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.tokens < self.seqlen:
            raise WandaServeError(f"--tokens {self.tokens} is less than one sample of --seqlen {self.seqlen} tokens")
        if self.dtype not in ("float32", "bfloat16"):
            raise WandaServeError(f"--dtype must be float32 or bfloat16 (autocast), got {self.dtype}")
        positive = {"--batch-size": self.batch_size, "--lr": self.lr, "--temperature": self.temperature,
                    "--checkpoint-every": self.checkpoint_every}
        for option, value in positive.items():
            if not value > 0:
                raise WandaServeError(f"{option} must be positive, got {value}")
        if not 0 < self.adam_beta2 < 1:
            raise WandaServeError(f"--adam-beta2 must lie between 0 and 1, got {self.adam_beta2}")
        if self.hidden_weight < 0 or not 0 <= self.warmup < 1:
            raise WandaServeError(f"need --hidden-weight >= 0 and 0 <= --warmup < 1, got {self.hidden_weight} and {self.warmup}")

    @property
    def samples(self) -> int:
        return math.ceil(self.tokens / self.seqlen)

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.out)

    def training_settings(self) -> dict:
        """What decides the training's result: a --resume must use the same."""
        kept = ("pruned", "teacher", "tokens", "seqlen", "batch_size", "lr", "warmup", "adam_beta2", "temperature", "hidden_weight",
                "train_embeddings", "data", "dtype", "seed")
        return {name: getattr(self, name) for name in kept}


def distillation_loss(student, teacher, temperature: float, hidden_weight: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions per token, plus the SquareHead hidden-state term.

    SquareHead (Kurtic et al. 2023): per decoder layer, the mean squared error of the student's hidden
    states against the teacher's, normalised by the teacher's mean square, averaged over layers.
    """
    t = temperature
    student_log_probs = F.log_softmax(student.logits.float() / t, dim=-1).flatten(0, 1)  # (B*T, V)
    teacher_log_probs = F.log_softmax(teacher.logits.float() / t, dim=-1).flatten(0, 1)
    loss = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean") * t * t
    if hidden_weight:
        layers = zip(student.hidden_states[1:], teacher.hidden_states[1:])
        squarehead = torch.stack([F.mse_loss(s.float(), h.float()) / h.float().pow(2).mean() for s, h in layers]).mean()
        loss = loss + hidden_weight * squarehead
    return loss


class DistillationTrainer(Trainer):
    def __init__(self, *args, teacher, temperature: float, hidden_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.temperature, self.hidden_weight = temperature, hidden_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = self.hidden_weight > 0
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=hidden, use_cache=False)
        student_out = model(**inputs, output_hidden_states=hidden, use_cache=False)
        loss = distillation_loss(student_out, teacher_out, self.temperature, self.hidden_weight)
        return (loss, student_out) if return_outputs else loss


class KeepMask(TrainerCallback, KeptZeros):
    """Pruned weights stay exactly zero: their gradients are zeroed, and the weights re-masked after every step."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        KeptZeros.__init__(self, [linear.weight for linear in linears.values()])

    def on_train_begin(self, args, state, control, **kwargs):
        self.attach()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.remask()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C finishes the current step, saves a checkpoint and ends training; a second Ctrl-C stops at once."""

    def __init__(self):
        self.interrupt = InterruptFlag()

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupt.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupt.raised:
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.interrupt.__exit__()


def loss_curve(state) -> list[tuple[int, float]]:
    """(step, loss) of every logged step, including those before a resume (Trainer restores its log)."""
    return [(entry["step"], entry["loss"]) for entry in state.log_history if "loss" in entry]


class RecoverProgress(TrainerCallback):
    """One bar: steps with ETA, the latest loss and tokens/s."""

    def __init__(self, tokens_per_step: int, enabled: bool):
        self.tokens_per_step, self.enabled = tokens_per_step, enabled
        self.bar = None
        self.started = self.first_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="recover", unit="step", disable=not self.enabled)
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer logs a step's loss after on_step_end, so the bar shows it from here.
        seconds = time.perf_counter() - self.started
        rate = (state.global_step - self.first_step) * self.tokens_per_step / seconds if seconds else 0.0
        losses = loss_curve(state)
        self.bar.set_postfix(loss=f"{losses[-1][1]:.4f}" if losses else "-", tokens_s=f"{rate:.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class _Windows(torch.utils.data.Dataset):
    def __init__(self, samples: list[torch.Tensor]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.samples[index]}


def _training_windows(corpus: Corpus, tokenizer, job: RecoverJob) -> list[torch.Tensor]:
    """job.samples windows of job.seqlen tokens drawn (seeded) from the calibration region of job.data."""
    if isinstance(corpus.calibration, list):  # JSONL samples: one text, so that every window is full length
        corpus = Corpus(corpus.name, "\n\n".join(corpus.calibration), corpus.evaluation)
    batches = calibration_batches(corpus, tokenizer, job.samples, job.seqlen, job.seed, batch_size=1)
    return [batch[0] for batch in batches]


def _default_teacher(pruned_location: str) -> str:
    report_path = Path(pruned_location) / PRUNE_REPORT_NAME
    if not report_path.is_file():
        raise WandaServeError(f"{pruned_location} has no {PRUNE_REPORT_NAME} naming its dense model; give --teacher")
    model = read_json_file(report_path).get("model", {})
    source = model.get("path") or model.get("source")
    if not source:
        raise WandaServeError(f"{report_path} does not name the dense model; give --teacher")
    return source


def _check_pair(student, student_tokenizer, teacher, teacher_tokenizer, teacher_name: str) -> None:
    if type(teacher.config) is not type(student.config):
        raise WandaServeError(f"--teacher {teacher_name} is a {teacher.config.model_type} model, the pruned one a "
                              f"{student.config.model_type}: distil from the model it was pruned from")
    if teacher.config.vocab_size != student.config.vocab_size or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise WandaServeError(f"--teacher {teacher_name} has another vocabulary than the pruned model: the KL of their "
                              "next-token distributions would compare different tokens")


def _freeze_embeddings(model) -> None:
    """Leave the token embeddings and the output head (one tensor where they are tied) out of training.

    Pruning leaves them dense and equal to the teacher's, and frozen they need no gradients or optimizer
    state (SmolLM2's tied 28M parameters: 0.22 GiB less peak memory; more for an untied vocabulary). On
    SmolLM2 at 100k tokens (docs/recover_settings.md) freezing cost +0.2% validation perplexity at
    recover's default settings, at the same speed; at batch 1 of 128-token windows, where the optimizer
    steps 8× as often, it gave -1.3% at ~10% more tokens/s.
    """
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def _zero_positions(linears: dict[str, torch.nn.Linear]) -> dict[str, str]:
    """A digest of each layer's set of zero positions."""
    return {name: hashlib.sha256((linear.weight.detach() == 0).cpu().numpy().tobytes()).hexdigest()
            for name, linear in linears.items()}


def _mask_check(before: dict[str, str], audit_before: dict, saved: Path, model) -> dict:
    """Zero positions and N:M validity re-measured on the saved tensors, against the pruned model's."""
    tensors = {}
    for file in sorted(saved.glob("*.safetensors")):
        tensors |= load_file(file)
    loaded = model.load_state_dict(tensors, strict=False)  # missing: only tied weights, which come back with their twin
    if loaded.unexpected_keys:
        raise WandaServeError(f"the saved model in {saved} does not match its own layout: {loaded.unexpected_keys[:3]}")
    linears = block_linears(model)
    after, audit_after = _zero_positions(linears), audit_linears(linears)
    changed = sorted(name for name in before if before[name] != after[name])
    lost = [p for p, ok in audit_before["all_nm_valid"].items() if ok and not audit_after["all_nm_valid"][p]]
    return {"zero_positions_identical": not changed, "changed_layers": changed, "nm_valid_before": audit_before["all_nm_valid"],
            "nm_valid_after": audit_after["all_nm_valid"], "nm_lost": lost, "sparsity": audit_after["overall_sparsity"],
            "passed": not changed and not lost}


def _checkpoint_to_resume(job: RecoverJob) -> str | None:
    """The latest checkpoint to resume from (with --resume), after checking it was made with the same settings."""
    directory = job.checkpoint_dir
    latest = get_last_checkpoint(str(directory)) if directory.is_dir() else None
    if not job.resume:
        if latest is not None:
            raise WandaServeError(f"{directory} holds checkpoints of an earlier run: add --resume to continue it, "
                                  "or remove it to start over")
        return None
    if latest is None:
        raise WandaServeError(f"--resume: no checkpoint in {directory}")
    stored = read_json_file(directory / JOB_NAME)
    if stored != job.training_settings():
        differ = sorted(k for k in stored.keys() | job.training_settings().keys() if stored.get(k) != job.training_settings().get(k))
        raise WandaServeError(f"--resume: the checkpoints in {directory} were made with other settings ({', '.join(differ)}); "
                              "give the same options, or remove the directory to start over")
    _check_intact(Path(latest), directory)
    return latest


def _check_intact(checkpoint: Path, directory: Path) -> None:
    """A checkpoint cut short (a killed save, a full disk) is refused with one line before training, not with the
    traceback of whichever file Trainer reads first: each safetensors header must cover its file, each of torch's
    zip archives (optimizer, scheduler, random state) must pass its checksums, and its JSON must parse."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if (failed := archive.testzip()) is not None:
                        raise zipfile.BadZipFile(f"{failed} fails its checksum")
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (SafetensorError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise damaged_checkpoint(directory, e, path.name) from e


@dataclass(frozen=True)
class Launch:
    """This process's place in a data-parallel launch (torchrun or accelerate launch set these); alone: 1 process."""

    processes: int
    rank: int
    local_rank: int

    @classmethod
    def from_environment(cls) -> Launch:
        environ = os.environ
        return cls(int(environ.get("WORLD_SIZE", "1")), int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check(self, job: RecoverJob) -> None:
        if any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("FSDP", "DEEPSPEED")):
            raise WandaServeError("recover keeps the mask on whole weights, which FSDP and DeepSpeed shard: "
                                  "launch it data-parallel (torchrun, or accelerate launch without FSDP or DeepSpeed)")
        if job.batch_size % self.processes:
            raise WandaServeError(f"--batch-size {job.batch_size} is the batch of all {self.processes} processes together: "
                                  f"give a multiple of {self.processes}")

    def device(self, name: str) -> torch.device:
        device = resolve_device(name)
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.processes > 1 else device


def run_recover(job: RecoverJob) -> dict | None:
    """Distil job.pruned from its teacher and write it, with recover_report.json, to job.out. Returns the report.

    Launched data-parallel, every process trains on its share of each batch and measures the models
    before training; only the first writes checkpoints, the output and the report, and measures the
    recovered model. The others return None.
    """
    started = time.perf_counter()
    launch = Launch.from_environment()
    launch.check(job)
    device = launch.device(job.device)
    if launch.main:
        check_output_dir(job.out, job.overwrite)  # before the checkpoints beside it are looked for
    resume_from = _checkpoint_to_resume(job)
    with atomic_output_dir(job.out, job.overwrite) if launch.main else nullcontext() as tmp:
        student = load_model(job.pruned)
        check_context(student.model, "--seqlen", job.seqlen)
        linears = block_linears(student.model)
        audit_before = audit_linears(linears)
        if audit_before["overall_sparsity"] == 0:
            raise WandaServeError(f"{job.pruned} has no pruned weights (no zeros in its linear layers): recover a pruned model")
        teacher_name = job.teacher or _default_teacher(student.location)
        teacher = load_model(teacher_name)
        _check_pair(student.model, student.tokenizer, teacher.model, teacher.tokenizer, teacher_name)
        corpus = load_corpus(job.data)
        windows = _training_windows(corpus, student.tokenizer, job)

        evaluations = [Evaluation(options, student, device, job.progress)
                       for options in ([job.evaluation] if job.evaluation else [])
                       + ([EvalOptions(job.out_of_domain, job.evaluation.seqlen, job.evaluation.max_windows)]
                          if job.evaluation and job.out_of_domain else [])]
        before = {e.name: e.perplexity(student.model) if job.reference else None for e in evaluations}
        teacher_ppl = {e.name: e.perplexity(teacher.model) if job.reference else None for e in evaluations}
        zeros_before = _zero_positions(linears)

        if launch.main:
            job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (job.checkpoint_dir / JOB_NAME).write_text(json.dumps(job.training_settings(), indent=2) + "\n")
        if not job.train_embeddings:
            _freeze_embeddings(student.model)
        if job.gradient_checkpointing:
            student.model.gradient_checkpointing_enable()
        args = TrainingArguments(
            output_dir=str(job.checkpoint_dir), max_steps=job.steps, per_device_train_batch_size=job.batch_size // launch.processes,
            learning_rate=job.lr, warmup_steps=job.warmup, lr_scheduler_type="cosine", weight_decay=0.0, adam_beta2=job.adam_beta2,
            logging_steps=1, save_strategy="steps", save_steps=job.checkpoint_every, save_total_limit=1,
            seed=job.seed, data_seed=job.seed, bf16=job.dtype == "bfloat16", use_cpu=device.type == "cpu",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        )
        keep_mask, stop = KeepMask(linears), StopOnInterrupt()
        progress = RecoverProgress(job.batch_size * job.seqlen, job.progress and launch.main)
        trainer = DistillationTrainer(model=student.model, args=args, train_dataset=_Windows(windows),
                                      callbacks=[keep_mask, stop, progress], teacher=teacher.model,
                                      temperature=job.temperature, hidden_weight=job.hidden_weight)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        train_started, train_cpu_started = time.perf_counter(), time.process_time()
        try:
            trainer.train(resume_from_checkpoint=resume_from)
        except BaseException:
            if launch.main and get_last_checkpoint(str(job.checkpoint_dir)) is None:
                shutil.rmtree(job.checkpoint_dir, ignore_errors=True)  # nothing to resume from
            raise
        train_seconds, train_cpu_seconds = time.perf_counter() - train_started, time.process_time() - train_cpu_started
        if stop.interrupt.raised:
            raise RecoveryInterrupted(job, trainer.state.global_step)
        if not launch.main:
            return None

        student.model.to("cpu")
        if job.gradient_checkpointing:
            student.model.gradient_checkpointing_disable()
        save_model(student, tmp)
        if (Path(student.location) / PRUNE_REPORT_NAME).is_file():  # how the mask was made still describes this model
            shutil.copyfile(Path(student.location) / PRUNE_REPORT_NAME, tmp / PRUNE_REPORT_NAME)
        mask = _mask_check(zeros_before, audit_before, tmp, student.model)
        if not mask["passed"]:
            raise WandaServeError(f"recovery changed the sparsity mask (layers {mask['changed_layers'][:3]}, N:M lost: "
                                  f"{mask['nm_lost']}); nothing was written")
        after = {e.name: e.perplexity(student.model) for e in evaluations}
        report = {
            "pruned": student.source,
            "teacher": teacher_name,
            "settings": asdict(job) | {"out": str(job.out)},
            "data": {"source": corpus.name, "region": "calibration", "windows": len(windows), "seqlen": job.seqlen},
            "tokens": len(windows) * job.seqlen,  # one pass over the windows; the last batch may be short
            "steps": trainer.state.global_step,
            "trained_parameters": sum(p.numel() for p in student.model.parameters() if p.requires_grad),
            "resumed_from": resume_from,
            "loss_curve": loss_curve(trainer.state),
            "perplexity": {name: {"teacher": teacher_ppl[name], "before": before[name], "after": after[name]} for name in before},
            "train_seconds": train_seconds,
            # CPU time of all this process's threads: well below threads × train_seconds, the machine was shared.
            "train_cpu_seconds": train_cpu_seconds,
            "threads": torch.get_num_threads(),
            "tokens_per_second": len(windows) * job.seqlen * (1 - _step_of(resume_from) / trainer.state.global_step) / train_seconds,
            "total_seconds": time.perf_counter() - started,
            "memory": peak_memory(device),
            "processes": trainer.args.world_size,  # as Trainer trained: data-parallel over this many
            "mask_check": mask,
            "versions": package_versions(),
        }
        (tmp / RECOVER_REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)  # the output is complete; nothing left to resume
    return report


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


class RecoveryInterrupted(WandaServeError):
    """Ctrl-C during training: a checkpoint was saved, and the message says how to resume."""

    def __init__(self, job: RecoverJob, step: int):
        super().__init__(f"interrupted at step {step} of {job.steps}; checkpoint saved in {job.checkpoint_dir}. "
                         "Run the same command with --resume to continue")
