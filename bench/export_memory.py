"""Where `export vllm`'s peak memory comes from: the peak resident memory of each of its steps, in one process.

Runs exporters.vllm_checkpoint.export_vllm (what `wanda-serve export vllm` runs) with each step it calls
wrapped: before a step, the process's resident memory is taken and its peak (VmHWM) restarted through
/proc/self/clear_refs; after it, the peak since then and the memory still held. A step inside another
(check_on_vllm's own load_model) is shown under it, and the outer step's peak counts it. The vLLM
engine runs in a process of its own: its peak is RUSAGE_CHILDREN's, reported apart. glibc's allocator is
left as the CLI has it, for what it keeps of freed memory is part of what a user's process holds.

    WANDA_SERVE_VLLM_PYTHON=.venv-vllm/bin/python python bench/export_memory.py MODEL --out docs/export_memory.md
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import cpu_name, provenance, write_page  # noqa: E402
from scale import VLLM_EXPORT_SOURCES  # noqa: E402

import exporters.vllm_checkpoint as vllm_checkpoint  # noqa: E402
from exporters.vllm_checkpoint import VllmExport  # noqa: E402

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
# export_vllm's steps, as it and check_on_vllm call them (names in exporters.vllm_checkpoint)
STEPS = ("load_model", "audit_linears", "_zero_masks", "cast_parameters", "prompt_batch", "torch_logits", "save_model",
         "release_memory", "_check_reload", "check_on_vllm", "torch_greedy", "vllm_greedy")
GB = 1e9


def status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


@dataclass
class Step:
    name: str  # "outer > inner" for a step inside another
    held_before: int
    peak: int = 0
    held_after: int = 0
    seconds: float = 0.0


@dataclass
class Page:
    command: str
    machine: str
    provenance: dict
    model: str
    dtype: str
    steps: list[Step] = field(default_factory=list)
    process_peak: int = 0  # this process's, its start (imports) included
    children_peak: int = 0  # the largest peak of the processes it started (vLLM's engine), ru_maxrss


class StepPeaks:
    """Wraps the named functions of a module so that each call records a Step."""

    def __init__(self):
        self.steps: list[Step] = []
        self.open: list[tuple[Step, float]] = []

    def wrap(self, module, names: tuple[str, ...]) -> None:
        for name in names:
            setattr(module, name, self.measured(name, getattr(module, name)))

    def measured(self, name, function):
        def call(*args, **kwargs):
            self.enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.exit()
        return call

    def enter(self, name: str) -> None:
        if self.open:  # the outer step's peak so far, before it is restarted for this one
            outer = self.open[-1][0]
            outer.peak = max(outer.peak, status("VmHWM"))
        CLEAR_REFS.write_text("5")
        held = status("VmRSS")
        # peak: at least what the step started with (the restarted VmHWM can miss a few pages the read itself added)
        step = Step(f"{self.open[-1][0].name} > {name}" if self.open else name, held, peak=held)
        self.steps.append(step)
        self.open.append((step, time.perf_counter()))

    def exit(self) -> None:
        step, started = self.open.pop()
        step.peak = max(step.peak, status("VmHWM"))
        step.held_after, step.seconds = status("VmRSS"), time.perf_counter() - started
        if self.open:
            outer = self.open[-1][0]
            outer.peak = max(outer.peak, step.peak)


def render(page: Page) -> str:
    lines = [
        "# Where `export vllm`'s peak memory comes from", "",
        f"Written by `{page.command}`. Machine: {page.machine}. Code version {page.provenance['code_version']}.", "",
        f"Model `{page.model}`, exported in {page.dtype}. Resident memory of this process (GB): before each step, its "
        "peak during the step (a step inside another is indented, and counted in the outer one's peak), and after it.",
        "",
        "| step | before | peak | peak − before | after | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step in page.steps:
        *outer, own = step.name.split(" > ")
        name = "&nbsp;&nbsp;" * len(outer) + f"`{own}`"
        lines.append(f"| {name} | {step.held_before / GB:.2f} | {step.peak / GB:.2f} | {(step.peak - step.held_before) / GB:+.2f} | "
                     f"{step.held_after / GB:.2f} | {step.seconds:.1f} |")
    lines += ["", f"Process peak, imports included: {page.process_peak / GB:.2f} GB. Its subprocesses' largest peak "
              f"(ru_maxrss; vLLM's engine, and anything the libraries fork, which starts counted at this process's "
              f"size): {page.children_peak / GB:.2f} GB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory or name, as `wanda-serve export vllm` takes it")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-vllm-check", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="Markdown page; its JSON beside it")
    args = parser.parse_args()
    if not CLEAR_REFS.exists():
        sys.exit("error: needs Linux's /proc/self/clear_refs to restart the peak")
    startup_peak = status("VmHWM")  # clear_refs restarts it, and ru_maxrss with it
    peaks = StepPeaks()
    peaks.wrap(vllm_checkpoint, STEPS)
    with tempfile.TemporaryDirectory() as work:
        job = VllmExport(Path(work) / "export", args.model, dtype=args.dtype, vllm_check=not args.no_vllm_check)
        peaks.measured("export_vllm", vllm_checkpoint.export_vllm)(job)
    page = Page(
        command=shlex.join(["python", *sys.argv]), machine=cpu_name(), provenance=provenance(VLLM_EXPORT_SOURCES),
        model=args.model, dtype=args.dtype, steps=peaks.steps,
        process_peak=max(startup_peak, *(step.peak for step in peaks.steps)),
        children_peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    )
    write_page(args.out, page, render)


if __name__ == "__main__":
    main()
