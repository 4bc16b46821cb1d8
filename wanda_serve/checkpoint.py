"""Long work that survives an interruption: Ctrl-C as a request to stop at the next safe point, and
checkpoints of a prune in progress that `prune --resume` goes on from.

A prune's checkpoints live beside its output, in OUT.checkpoints/ (as recover's do), never in it: the
output appears only complete. One is taken after a block, at most every `every_seconds` and whenever
Ctrl-C asked to stop: the weights of the blocks finished since the previous one (each block's file is
written once), the hidden states the next block reads, and what the engine and the job recorded so far.
Resuming loads the dense model, puts the finished blocks back and goes on from the next block, so the
result is the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from wanda_serve.artifacts import read_json_file, write_file_atomically
from wanda_serve.errors import WandaServeError

SETTINGS_NAME = "prune_job.json"  # what decides the result: a --resume must give the same
STATE_NAME = "state.json"  # written last: the checkpoint it describes is complete


def checkpoint_dir(out: Path) -> Path:
    """Where a prune or a recover keeps its checkpoints: beside the output, not in it, for the output appears
    only when complete and checkpoints must outlive a crash. Absolute, as "." or "a/.." name no directory."""
    out = Path(os.path.abspath(out))
    return out.with_name(f"{out.name}.checkpoints")


class InterruptFlag:
    """While entered, a first Ctrl-C only sets `raised`, for the work to stop at its next safe point and say
    how to resume; a second one stops at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _on_sigint(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> InterruptFlag:
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def damaged_checkpoint(directory: Path, error: Exception, file: str | None = None) -> WandaServeError:
    """A file of the checkpoint in `directory` cut short (a full disk, a process killed while writing) or removed:
    resuming from it cannot work (prune's and recover's checkpoints alike)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return WandaServeError(f"--resume: the checkpoint in {directory} is damaged ({f'{file}: ' if file else ''}{detail}); "
                           "remove the directory to start over")


class PruneInterrupted(WandaServeError):
    """Ctrl-C during a prune: a checkpoint was saved, and the message says how to resume."""


@dataclass
class Restored:
    """A checkpoint put back: the blocks before `next_block` hold their pruned weights again."""

    next_block: int
    hidden: list[torch.Tensor]  # what block `next_block` reads, per calibration call
    record: dict  # the engine's PruneRecord so far, as asdict gives it
    job: dict  # what the job measured before pruning (the dense perplexity)


@dataclass
class PruneCheckpoint:
    directory: Path
    settings: dict  # everything that decides the pruned weights and the report
    every_seconds: float
    resume: bool
    job: dict = field(default_factory=dict)  # kept with every checkpoint, for the report of a resumed run
    interrupt: InterruptFlag = field(default_factory=InterruptFlag)
    _blocks_saved: int = 0
    _last_saved: float = field(default_factory=time.monotonic)

    @cached_property
    def stored(self) -> dict | None:
        """The state of the checkpoint to resume from (None: start afresh), after checking --resume may use it."""
        state_path = self.directory / STATE_NAME
        if not self.resume:
            if state_path.is_file():
                raise WandaServeError(f"{self.directory} holds a checkpoint of an earlier prune: add --resume to continue "
                                      "it, or remove it to start over")
            return None
        if not state_path.is_file():
            raise WandaServeError(f"--resume: no checkpoint in {self.directory}")
        stored = read_json_file(self.directory / SETTINGS_NAME)
        if stored != self.settings:
            differ = sorted(k for k in stored.keys() | self.settings.keys() if stored.get(k) != self.settings.get(k))
            raise WandaServeError(f"--resume: the checkpoint in {self.directory} was made with other settings "
                                  f"({', '.join(differ)}); give the same options, or remove the directory to start over")
        return read_json_file(state_path)

    def restore(self, blocks: nn.ModuleList) -> Restored | None:
        """Put the finished blocks of the checkpoint back into `blocks`; None if there is nothing to resume."""
        state = self.stored
        if state is None:
            return None
        try:
            for index in range(state["next_block"]):
                blocks[index].load_state_dict(load_file(self.directory / _block_name(index)))
            hidden = load_file(self.directory / state["hidden"])
        except (OSError, SafetensorError, RuntimeError, KeyError) as e:
            raise damaged_checkpoint(self.directory, e) from e
        self._blocks_saved = state["next_block"]
        return Restored(state["next_block"], [hidden[str(i)] for i in range(len(hidden))], state["record"], state["job"])

    def block_done(self, index: int, blocks: nn.ModuleList, hidden: list[torch.Tensor], record) -> None:
        """After block `index`: a checkpoint if one is due or Ctrl-C asked to stop (then PruneInterrupted)."""
        due = time.monotonic() - self._last_saved >= self.every_seconds
        if not (due or self.interrupt.raised) or index + 1 == len(blocks):
            return  # after the last block the output is written at once; nothing would be left to resume
        self.save(index + 1, blocks, hidden, record)
        if self.interrupt.raised:
            raise PruneInterrupted(f"interrupted after block {index + 1} of {len(blocks)}; checkpoint saved in "
                                   f"{self.directory}. Run the same command with --resume to continue")

    def save(self, next_block: int, blocks: nn.ModuleList, hidden: list[torch.Tensor], record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._blocks_saved == 0:  # this run's first checkpoint (a resumed run found the same settings there)
            write_file_atomically(self.directory / SETTINGS_NAME, json.dumps(self.settings, indent=2) + "\n", overwrite=True)
        for index in range(self._blocks_saved, next_block):
            _save_atomically({name: tensor.detach().cpu().contiguous() for name, tensor in blocks[index].state_dict().items()},
                             self.directory / _block_name(index))
        hidden_name = f"hidden-{next_block}.safetensors"  # named by block: the state never points at a half-written file
        _save_atomically({str(i): h.detach().cpu().contiguous() for i, h in enumerate(hidden)}, self.directory / hidden_name)
        state = {"next_block": next_block, "hidden": hidden_name, "record": asdict(record), "job": self.job}
        write_file_atomically(self.directory / STATE_NAME, json.dumps(state, indent=2) + "\n", overwrite=True)
        for old in self.directory.glob("hidden-*.safetensors"):
            if old.name != hidden_name:
                old.unlink()
        self._blocks_saved, self._last_saved = next_block, time.monotonic()


def _block_name(index: int) -> str:
    return f"block-{index}.safetensors"


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial)
    partial.replace(path)
