"""The benchmark's results as types: each model at each concurrency level, its ratios to dense, and the JSON.

bench_results.json keeps `vllm bench serve`'s field names as keys. Ratios are taken of the fields
declared compared() (deploy/metrics.py), here and in BenchmarkMetrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from deploy.metrics import (BenchmarkMetrics, RequestOutput, calculate_metrics, compared, compared_ratios,
                            cost_per_million_output_tokens)

MAX_ERRORS = 5  # distinct failure messages kept per model and level


@dataclass(frozen=True)
class LevelResult:
    """One model at one concurrency level, its rounds pooled."""

    max_concurrency: int
    metrics: BenchmarkMetrics  # over every request of every round
    output_throughput_per_round: tuple[float, ...]  # to show drift
    errors: tuple[str, ...]  # the first distinct failure messages, sorted
    dollars_per_million_output_tokens: float | None = compared(default=None)  # None: no price given, or nothing served

    @classmethod
    def pooled(cls, rounds: list[tuple[list[RequestOutput], float]], level: int, hour_price: float | None) -> LevelResult:
        """One level's rounds, each (outputs, wall seconds), pooled: throughput over the summed wall time, latency over all requests."""
        outputs = [output for round_outputs, _ in rounds for output in round_outputs]
        metrics = calculate_metrics(outputs, sum(duration for _, duration in rounds))
        return cls(
            max_concurrency=level, metrics=metrics,
            output_throughput_per_round=tuple(calculate_metrics(o, d).output_throughput for o, d in rounds),
            errors=tuple(sorted({o.error for o in outputs if not o.success})[:MAX_ERRORS]),
            dollars_per_million_output_tokens=None if hour_price is None else
            cost_per_million_output_tokens(hour_price, metrics.output_throughput),
        )

    def value(self, name: str):
        """A field of this result or of its metrics, by its name in the JSON."""
        return getattr(self.metrics if name in METRIC_FIELDS else self, name)

    def ratios(self, dense: LevelResult) -> dict[str, float]:
        """This model against dense at the same level: a ratio per compared field where dense's is known and not 0."""
        return {"max_concurrency": self.max_concurrency, **compared_ratios(self.metrics, dense.metrics), **compared_ratios(self, dense)}

    def to_json(self, priced: bool) -> dict:
        """The level as bench_results.json has it; the cost only when a price was given."""
        record = {"max_concurrency": self.max_concurrency, **asdict(self.metrics),
                  "output_throughput_per_round": list(self.output_throughput_per_round), "errors": list(self.errors)}
        if priced:
            record["dollars_per_million_output_tokens"] = self.dollars_per_million_output_tokens
        return record


METRIC_FIELDS = frozenset(item.name for item in dataclasses.fields(BenchmarkMetrics))
# what LevelResult.value accepts
VALUE_FIELDS = METRIC_FIELDS | {item.name for item in dataclasses.fields(LevelResult)} - {"metrics"}
COMPARED_FIELDS = frozenset(item.name for cls in (BenchmarkMetrics, LevelResult) for item in dataclasses.fields(cls)
                            if item.metadata.get("compared"))


@dataclass(frozen=True)
class BenchResults:
    """A whole benchmark run: what was served and how, and each model's results level by level."""

    created: str
    workload: dict
    concurrency: tuple[int, ...]
    models: dict[str, dict]  # per label: what was served, its command, its greedy check
    perplexity: dict
    hour_price: float | None
    levels: dict[str, list[LevelResult]]  # per label, dense first: one result per concurrency level
    versions: dict

    @property
    def labels(self) -> list[str]:
        return list(self.levels)

    def ratios(self) -> dict[str, list[dict[str, float]]]:
        """Each model but dense against dense, level by level."""
        dense = self.levels["dense"]
        return {label: [level.ratios(baseline) for level, baseline in zip(levels, dense)]
                for label, levels in self.levels.items() if label != "dense"}

    def to_json(self) -> dict:
        priced = self.hour_price is not None
        return {"created": self.created, "workload": self.workload, "concurrency": list(self.concurrency), "models": self.models,
                "perplexity": self.perplexity, "hour_price": self.hour_price,
                "results": {label: [level.to_json(priced) for level in levels] for label, levels in self.levels.items()},
                "versions": self.versions, "ratios": self.ratios()}
