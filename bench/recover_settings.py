"""Choose recover's learning rate and batch size on calibration text only, never the evaluation text.

The Wikipedia calibration region is split once, at a paragraph boundary: its first 90% is the
training text, its last 10% the validation text; the held-out evaluation region that
docs/recover_benchmark.md reports on is not read. For each setting of --settings (learning rate, batch
size, window length, temperature, AdamW's beta2, embeddings, warm-up), the default recipe's pruned model (bench/recover.py's, the same
bytes) is recovered on the training text with `wanda-serve recover --data train.txt --eval-data valid.txt` at one budget, and
the validation perplexity is recorded with the training speed. Writes a Markdown table and its JSON.

    python bench/recover_settings.py --out docs/recover_settings.md

Results are stored in --records with the options, the pruned weights' hash and the code provenance
that decide them, as bench/recover.py stores its own, and committed: --resume reuses only matching
ones, in a later session too, on any machine as long as the pruned weights are the same bytes (all
stored settings, when they started from one pruned model, are reused without pruning again). Each
row names the machine that trained it; times are compared only within one machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_methods import Machines, incomplete_banner, run_benchmark, write_json  # noqa: E402
from recover import (  # noqa: E402
    RECIPES, prune_options, pruned_hashes, recover, run_provenance, runs_from_one_pruned_model, stored_as_expected,
)

from wanda_serve.data import load_corpus  # noqa: E402
from wanda_serve.recover import RecoverJob  # noqa: E402

RECIPE = "wanda-permute-2of4"  # the default recipe, as bench/recover.py names it
VALIDATION_SHARE = 0.10
SHARED = {"--seed": "0", "--out-of-domain": "none", "--eval-seqlen": "1024", "--no-reference": None}


@dataclass(frozen=True)
class Setting:
    """One row: LR:BATCH[:SEQLEN[:TEMPERATURE[:BETA2[:EMBEDDINGS[:WARMUP]]]]] on the command line, EMBEDDINGS `trained`
    or `frozen`, WARMUP the warm-up's share of the steps; omitted or empty fields are recover's defaults."""

    lr: str
    batch: int
    seqlen: int = RecoverJob.seqlen
    temperature: float = RecoverJob.temperature
    beta2: float = RecoverJob.adam_beta2
    train_embeddings: bool = RecoverJob.train_embeddings
    warmup: float = RecoverJob.warmup

    @classmethod
    def parse(cls, text: str) -> Setting:
        lr, batch, *rest = text.split(":")
        seqlen, temperature, beta2, embeddings, warmup = (rest + [None] * 5)[:5]
        if embeddings not in (None, "", "trained", "frozen"):
            raise ValueError(f"{text}: EMBEDDINGS is trained or frozen, got {embeddings}")
        return cls(lr, int(batch), int(seqlen or cls.seqlen), float(temperature or cls.temperature), float(beta2 or cls.beta2),
                   embeddings == "trained" if embeddings else cls.train_embeddings, float(warmup or cls.warmup))

    @property
    def embeddings(self) -> str:
        return "trained" if self.train_embeddings else "frozen"

    @property
    def name(self) -> str:
        # The fields at recover's default stay out of the name, so results stored before they were options still match.
        extra = (f"-seqlen{self.seqlen}" * (self.seqlen != RecoverJob.seqlen)
                 + f"-t{self.temperature:g}" * (self.temperature != RecoverJob.temperature)
                 + f"-beta2{self.beta2:g}" * (self.beta2 != RecoverJob.adam_beta2)
                 + f"-embeddings-{self.embeddings}" * (self.train_embeddings != RecoverJob.train_embeddings)
                 + f"-warmup{self.warmup:g}" * (self.warmup != RecoverJob.warmup))
        return f"lr{self.lr}-batch{self.batch}{extra}"


def split_calibration(work: Path) -> tuple[Path, Path]:
    """The wiki calibration region as a training file and a validation file (its last paragraphs)."""
    paragraphs = load_corpus("wiki").calibration.split("\n\n")
    total, held = sum(map(len, paragraphs)), 0
    split = len(paragraphs)
    while held < VALIDATION_SHARE * total:
        split -= 1
        held += len(paragraphs[split])
    train, valid = work / "train.txt", work / "valid.txt"
    train.write_text("\n\n".join(paragraphs[:split]))
    valid.write_text("\n\n".join(paragraphs[split:]))
    return train, valid


def recover_options(tokens: int, setting: Setting, train: Path, valid: Path) -> dict[str, str | None]:
    return {"--tokens": str(tokens), "--lr": setting.lr, "--batch-size": str(setting.batch), "--data": str(train),
            "--eval-data": str(valid), "--seqlen": str(setting.seqlen), "--temperature": str(setting.temperature),
            "--adam-beta2": str(setting.beta2), f"--{'train' if setting.train_embeddings else 'freeze'}-embeddings": None,
            "--warmup": str(setting.warmup), **SHARED}


def expected_record(options: dict[str, str | None]) -> dict:
    """What decides a stored result but the pruned weights' hash, keyed by command as bench/prune_methods.py's
    stored_result compares them."""
    return {"options": {"prune": prune_options(RECIPES[RECIPE]), "recover": options}, "provenance": run_provenance()}


def render(rows: list[dict], machines: dict[str, str], command: str, tokens: int, missing: tuple[str, ...] = ()) -> str:
    """The table; rows[0] is recover's default, which every other row is compared with. `missing`: the settings
    not measured yet (--stored-only)."""
    default, best = rows[0], min(rows, key=lambda r: r["validation"])
    lines = [
        "# Recovery settings, chosen on calibration text",
        "",
        f"Written by `{command}`; raw numbers in the JSON beside this page.",
        "",
        *incomplete_banner(len(rows), missing, "settings"),
        f"The default recipe's pruned SmolLM2 recovered on {tokens} tokens of the first {1 - VALIDATION_SHARE:.0%} of the "
        f"Wikipedia calibration region; validation perplexity on its last {VALIDATION_SHARE:.0%} (never on the held-out "
        "evaluation region), in windows of 1024 tokens. Batch: windows of `seqlen` tokens per optimizer step, so a smaller "
        "batch of the same windows takes more steps. Temperature: of both distributions in the KL. "
        "Beta2: AdamW's second-moment decay. Embeddings: the token embeddings and the output head trained with the "
        "rest, or frozen at the teacher's values. Warm-up: the share of the steps over which the learning rate rises "
        "before its cosine decay. "
        "The first row is recover's default. Machine: where the setting trained:",
        "",
        *(f"- {label}: {description}" for label, description in machines.items()),
        "",
        "| lr | batch | seqlen | temperature | beta2 | embeddings | warm-up | machine | steps | validation perplexity | vs default | train s "
        "| tokens/s |",
        "|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['lr']} | {r['batch']} | {r['seqlen']} | {r['temperature']:g} | {r['beta2']:g} | {r['embeddings']} | {r['warmup']:g} | "
                     f"{r['machine']} | {r['steps']} | "
                     f"{r['validation']:.2f}{mark} | {r['validation'] / default['validation'] - 1:+.1%} | "
                     f"{r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} |")
    time_ratio = (f"at {best['train_seconds'] / default['train_seconds']:.2f}× its training time on this CPU"
                  if best["machine"] == default["machine"] else "trained on another machine, so their times do not compare")
    lines += ["", f"Best{' so far' * bool(missing)}: {describe(best)}, {best['validation'] / default['validation'] - 1:+.1%} in validation perplexity "
              f"against the default ({describe(default)}), {time_ratio}.", ""]
    return "\n".join(lines)


def describe(row: dict) -> str:
    return (f"lr {row['lr']}, batch {row['batch']}, seqlen {row['seqlen']}, temperature {row['temperature']:g}, beta2 {row['beta2']:g}, "
            f"embeddings {row['embeddings']}, warm-up {row['warmup']:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=100_000, help="the budget the settings are chosen for")
    parser.add_argument("--settings", default="3e-4:4,3e-4:4::::trained,3e-4:1,3e-4:4:::0.95,3e-4:1:::0.95,3e-4:1:128::0.95,"
                                              "3e-4:1:128::0.95:trained,1e-3:4,1e-3:1,1e-4:1,3e-4:1:1024,3e-4:2:512,3e-4:4:256:2",
                        help="LR:BATCH[:SEQLEN[:TEMPERATURE[:BETA2[:EMBEDDINGS[:WARMUP]]]]], comma-separated; the first is recover's default")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-recover-settings"), help="the split text, recovered models")
    parser.add_argument("--records", type=Path, default=Path("docs/recover_settings"), help="each setting's stored result")
    parser.add_argument("--pruned-work", type=Path, default=Path("runs/bench-recover"), help="where bench/recover.py prunes")
    parser.add_argument("--resume", action="store_true", help="reuse results stored in --records, if measured the same way")
    parser.add_argument("--recompute-stale", action="store_true")
    parser.add_argument("--stored-only", action="store_true",
                        help="measure nothing: write the page from the stored results, naming the settings they lack")
    args = parser.parse_args()
    if args.stored_only and args.recompute_stale:
        parser.error("--stored-only measures nothing: it does not go with --recompute-stale")
    args.work.mkdir(parents=True, exist_ok=True)
    train, valid = split_calibration(args.work)
    settings = {f"{setting.name}-{args.tokens}": setting for setting in map(Setting.parse, args.settings.split(","))}
    options = {name: recover_options(args.tokens, setting, train, valid) for name, setting in settings.items()}
    expected = {args.records / f"{name}.json": expected_record(given) for name, given in options.items()}
    if args.stored_only:
        records = stored_as_expected(expected)
        if next(iter(expected)) not in records or len(pruned_hashes(records)) > 1:
            sys.exit("Error: --stored-only needs the default setting stored, and every stored setting from one pruned "
                     f"model, in {args.records}")
    else:
        args.records.mkdir(parents=True, exist_ok=True)
        records = dict(zip(expected, runs_from_one_pruned_model(
            RECIPE, args.pruned_work, expected, lambda pruned, name: recover(pruned, args.work / name, options[name]),
            args.resume, args.recompute_stale)))
    measured = {name: (setting, records[path]) for (name, setting), path in zip(settings.items(), expected) if path in records}
    missing = tuple(name for name in settings if name not in measured)
    rows, machines = [], Machines()
    for setting, record in measured.values():
        report = record["report"]
        (validation,) = report["perplexity"].values()
        rows.append({**asdict(setting), "embeddings": setting.embeddings, "machine": machines.of(record), "steps": report["steps"],
                     "validation": validation["after"]["perplexity"], "train_seconds": report["train_seconds"],
                     "tokens_per_second": report["tokens_per_second"]})
    command = shlex.join(["python", "bench/recover_settings.py", *sys.argv[1:]])
    write_json(args.out.with_suffix(".json"), {"command": command, "machines": machines.legend(), "rows": rows,
                                                "missing": list(missing)})
    args.out.write_text(render(rows, machines.legend(), command, args.tokens, missing))


if __name__ == "__main__":
    run_benchmark(main)
