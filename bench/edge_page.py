"""bench/edge.py's page: its rows, the goal's verdict, and the Markdown."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from edge_runtimes import PYTORCH

GOAL_SPEEDUP = 2.0  # decode tokens/s of at least one edge export over PyTorch eager fp32's, same model
REFERENCE = (PYTORCH, "fp32")  # (export, precision) of the row every other is compared with


@dataclass(frozen=True)
class Row:
    model: str  # dense, pruned
    export: str
    precision: str
    runtime: str
    size_bytes: int | None
    perplexity: float | None  # None: not measured (not_measured says why)
    prefill_seconds: tuple[float, ...] = ()  # one per round, the rounds aligned across rows
    decode_seconds: tuple[float, ...] = ()
    decode_steps: int = 0  # forward passes in each decode_seconds
    tokens: tuple[int, ...] = ()  # the greedy continuation
    not_measured: str | None = None

    @property
    def label(self) -> str:
        return f"{self.export} {self.precision} on {self.runtime}"

    @property
    def timed(self) -> bool:
        return bool(self.decode_seconds)

    @property
    def prefill_ms(self) -> float:
        return statistics.median(self.prefill_seconds) * 1000

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / statistics.median(self.decode_seconds)

    @property
    def decode_spread(self) -> float:
        """(slowest - fastest) / median of the decode rounds."""
        return (max(self.decode_seconds) - min(self.decode_seconds)) / statistics.median(self.decode_seconds)


def reference_row(rows: tuple[Row, ...], model: str) -> Row | None:
    return next((row for row in rows if row.model == model and (row.export, row.precision) == REFERENCE), None)


def decode_speedup(row: Row, reference: Row) -> float:
    """The median over rounds of the reference's decode seconds over the row's, round by round."""
    return statistics.median(ref / own for ref, own in zip(reference.decode_seconds, row.decode_seconds))


def tokens_agreeing(row: Row, reference: Row) -> int:
    return next((i for i, (a, b) in enumerate(zip(row.tokens, reference.tokens)) if a != b), min(len(row.tokens), len(reference.tokens)))


@dataclass(frozen=True)
class Verdict:
    """The goal for one model: decode at least GOAL_SPEEDUP × PyTorch eager fp32 through an edge export."""

    model: str
    reference: Row
    qualifying: tuple[tuple[Row, float], ...]  # edge rows at or above the goal, with their speed-ups, lowest perplexity first
    fastest: tuple[Row, float] | None  # the fastest timed edge row; None: none was timed
    dense_perplexity: float | None = None  # the first model's PyTorch fp32 perplexity, for the models after it

    @property
    def met(self) -> bool:
        return bool(self.qualifying)

    def text(self) -> str:
        ref = self.reference
        if self.fastest is None:
            return f"{self.model}: **not measured**: no edge export was timed"
        if self.met:
            row, speedup = self.qualifying[0]
            others = "; also " + ", ".join(f"{r.label} {s:.2f}× at {_cost(r, ref)}" for r, s in self.qualifying[1:]) \
                if len(self.qualifying) > 1 else ""
            return (f"{self.model}: **met** by {len(self.qualifying)} of the edge exports. At the lowest perplexity cost, "
                    f"{row.label} decodes {speedup:.2f}× PyTorch eager fp32 ({row.decode_tokens_per_second:.1f} vs "
                    f"{ref.decode_tokens_per_second:.1f} tokens/s) at {_cost(row, ref)}{self._against_dense(row)}{others}.")
        row, speedup = self.fastest
        return (f"{self.model}: **not met**. The fastest edge export, {row.label}, decodes {speedup:.2f}× PyTorch eager fp32 "
                f"({row.decode_tokens_per_second:.1f} vs {ref.decode_tokens_per_second:.1f} tokens/s), "
                f"{GOAL_SPEEDUP / speedup:.2f}× short of the goal, at {_cost(row, ref)}{self._against_dense(row)}.")

    def _against_dense(self, row: Row) -> str:
        if self.dense_perplexity is None or row.perplexity is None:
            return ""
        return f" ({row.perplexity / self.dense_perplexity:.2f}× the dense model's PyTorch fp32 perplexity, {self.dense_perplexity:.2f})"


def _cost(row: Row, reference: Row) -> str:
    if row.perplexity is None or reference.perplexity is None:
        return "a perplexity not measured"
    return f"perplexity {reference.perplexity:.2f} → {row.perplexity:.2f} ({row.perplexity / reference.perplexity - 1:+.1%})"


def verdicts(rows: tuple[Row, ...]) -> list[Verdict]:
    """The goal's verdict for each model that has a timed PyTorch eager fp32 row (the first model's perplexity, the
    dense one's, is also each later model's baseline)."""
    found = []
    models = list(dict.fromkeys(row.model for row in rows))
    first = reference_row(rows, models[0]) if models else None
    for model in models:
        reference = reference_row(rows, model)
        if reference is None or not reference.timed:
            continue
        edge = [(row, decode_speedup(row, reference)) for row in rows if row.model == model and row.export != PYTORCH and row.timed]
        qualifying = sorted(((row, speedup) for row, speedup in edge if speedup >= GOAL_SPEEDUP),
                            key=lambda pair: (pair[0].perplexity is None, pair[0].perplexity or 0.0, -pair[1]))
        dense = first.perplexity if first is not None and model != models[0] else None
        found.append(Verdict(model, reference, tuple(qualifying), max(edge, key=lambda pair: pair[1], default=None), dense))
    return found


def goal_summary(found: list[Verdict]) -> str:
    met, missed = [v.model for v in found if v.met], [v.model for v in found if not v.met]
    if not found:
        return "**Not measured**: no model has a timed PyTorch eager fp32 row to compare with."
    if not met:
        return f"**Not met** for any model ({', '.join(missed)})."
    return f"**Met** for {' and '.join(met)}" + (f"; **not met** for {' and '.join(missed)}." if missed else ".")


@dataclass(frozen=True)
class ExportRow:
    model: str
    export: str  # its key
    command: str
    seconds: float  # the export's whole process
    checks: str
    zeros_kept: bool



@dataclass(frozen=True)
class Page:
    command: str
    seconds: float  # this invocation
    machine: dict
    settings: dict
    exports: tuple[ExportRow, ...]
    rows: tuple[Row, ...]
    llama_cpp: str | None  # why llama.cpp was not measured; None: it was


def render(page: Page) -> str:
    settings, machine = page.settings, page.machine
    lines = [
        f"# Edge exports of {settings['model']}: size, perplexity and CPU speed",
        "",
        f"Written by `{page.command}` ({page.seconds / 60:.0f} min for this invocation); every number with its options and "
        "provenance, and every timing round, is in the JSON beside this page.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, no GPU; ATen kernels {machine['cpu_capability']}; PyTorch on "
        f"{machine['torch_threads']} threads, onnxruntime and onnxruntime-genai on their default thread pools, llama.cpp (where it runs) "
        f"on {machine['torch_threads']}; " + ", ".join(f"{name} {version}" for name, version in machine["versions"].items()) + ".",
        "",
        f"Models: {settings['model']} (dense), and the same pruned by `{settings['prune_command']}` (pruned: "
        "the default recipe, Wanda 2:4 with channel permutation). Each export is the real CLI in its own process, and each "
        "was checked by its own command (below) before it was measured here.",
        "",
        "How each figure is measured:",
        "",
        "- **Size**: the files the runtime loads (graph and its external weights; the GGUF file; PyTorch fp32: the "
        "safetensors checkpoint; bf16 is cast from it as it loads).",
        f"- **Perplexity**: the first {settings['eval_windows']} windows of {settings['eval_seqlen']} tokens of "
        f"{settings['data']}, held-out region, through the runtime itself: PyTorch's logits; onnx through wanda-serve's "
        "onnxruntime runner (`OnnxCausalLM.logits`, one pass with an empty past); onnxruntime-genai through a new "
        "`Generator` per window, `append_tokens(window)` then `get_output(\"logits\")` (every position; `get_logits()` "
        "returns only the last one); GGUF through llama.cpp when it runs here, and through transformers' GGUF loader (the "
        "file read back, dequantized to float32 and run by PyTorch: what the format's rounding costs, not llama.cpp's "
        "kernels).",
        f"- **Prefill ms**: from a new cache (onnxruntime-genai: a new `Generator`) to the first token of a "
        f"{settings['prompt_tokens']}-token prompt, batch 1: the held-out tokens that follow the perplexity windows.",
        f"- **Decode tokens/s**: {settings['new_tokens']} greedy tokens; the first comes from the prefill, the other "
        f"{settings['new_tokens'] - 1} from one forward pass of one token each through the runtime's KV cache, the argmax taken "
        "in Python for every runtime (onnxruntime-genai: `append_tokens([[token]])` then `get_logits()`). End of sequence "
        "neither stops nor is masked. × fp32: the same model's PyTorch eager fp32, the median of the per-round ratios. "
        "Spread: (slowest − fastest) / median round. Greedy: leading tokens equal to PyTorch fp32's.",
        f"- **Side by side**: this is a noisy shared {machine['cores']}-core CPU, so every runtime of both models is loaded "
        f"once in one process, warmed up ({settings['warmup']} round), then timed in {settings['repeats']} rounds; each "
        "round runs every runtime once, in an order rotated every round, so that drift hits all of them alike. Timings "
        "from separate runs are not comparable and are never reused.",
        "",
        "## Results",
        "",
        "| model | export | precision | runtime | size MiB | perplexity | × fp32 | prefill ms | decode tok/s | × fp32 "
        "| spread | greedy |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = {}
    for row in page.rows:
        reference = reference_row(page.rows, row.model)
        size = "-" if row.size_bytes is None else f"{row.size_bytes / 2**20:.1f}"
        ppl = "-" if row.perplexity is None else f"{row.perplexity:.2f}"
        ppl_ratio = "-" if row.perplexity is None or reference is None or reference.perplexity is None else \
            f"{row.perplexity / reference.perplexity:.2f}"
        if row.timed:
            compared = reference is not None and reference.timed
            timing = (f"{row.prefill_ms:.1f} | {row.decode_tokens_per_second:.1f} | "
                      f"{f'{decode_speedup(row, reference):.2f}' if compared else '-'} | {row.decode_spread:.0%} | "
                      f"{f'{tokens_agreeing(row, reference)} of {len(row.tokens)}' if compared else '-'}")
        else:
            mark = notes.setdefault(row.not_measured or "not timed", len(notes) + 1)
            timing = f"not timed ({mark}) | - | - | - | -"
            if row.perplexity is None:
                ppl = f"not measured ({mark})"
        lines.append(f"| {row.model} | {row.export} | {row.precision} | {row.runtime} | {size} | {ppl} | {ppl_ratio} | {timing} |")
    lines += ["", *(f"({mark}) {reason}." for reason, mark in notes.items())]

    found = verdicts(page.rows)
    lines += [
        "",
        f"## Goal: decode ≥ {GOAL_SPEEDUP:g}× PyTorch eager fp32 through at least one edge export",
        "",
        goal_summary(found),
        "",
        *(f"- {verdict.text()}" for verdict in found),
        "",
        "## llama.cpp",
        "",
        f"Measured with llama-cpp-python {machine['versions'].get('llama-cpp-python')} (the `llama.cpp` rows)."
        if page.llama_cpp is None else
        f"Not measured: {page.llama_cpp}. The GGUF files' speed in llama.cpp is therefore unknown here; their perplexity is "
        "measured through transformers' GGUF loader only.",
        "",
        "## The exports and their own checks",
        "",
        "```sh",
        *(row.command for row in page.exports),
        "```",
        "",
        "| model | export | process s | checks (from its manifest) | pruned zeros kept |",
        "|---|---|---:|---|---|",
        *(f"| {row.model} | {row.export} | {row.seconds:.0f} | {row.checks} | {'yes' if row.zeros_kept else '**NO**'} |"
          for row in page.exports),
    ]
    return "\n".join(lines) + "\n"
