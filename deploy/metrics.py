"""Benchmark metrics: a pure function from request outputs to the numbers `vllm bench serve` reports.

Definitions follow vLLM's `benchmarks/serve.py` so the two can be put side by side: TTFT is the
time to the first streamed chunk, ITL the gaps between later chunks, TPOT (latency − TTFT) /
(output tokens − 1) per request, and throughputs count completed requests over the wall time of
the level. Failed requests are counted, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)  # the p{N}_{metric}_ms fields
# Field metadata: the benchmark reports this field of each model against dense, as a ratio.
COMPARED = {"compared": True}


def compared(**kwargs) -> dataclasses.Field:
    """A dataclass field that the benchmark reports as a ratio to dense."""
    return field(metadata=COMPARED, **kwargs)


@dataclass
class RequestOutput:
    """What one request did; recorded by the client, which never raises."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first streamed chunk
    itl: list[float] = field(default_factory=list)  # seconds between later chunks
    latency: float = 0.0  # seconds from sending to the last chunk
    start_time: float = 0.0  # perf_counter at sending


@dataclass(frozen=True)
class BenchmarkMetrics:
    """One benchmark level, flat, with `vllm bench serve`'s field names (the JSON keys); `_ms` in milliseconds."""

    duration: float  # seconds of wall time
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float = compared()
    output_throughput: float = compared()
    total_token_throughput: float = compared()
    # per latency metric: mean, median, standard deviation, percentiles
    mean_ttft_ms: float = compared()
    median_ttft_ms: float = compared()
    std_ttft_ms: float = compared()
    p50_ttft_ms: float = compared()
    p90_ttft_ms: float = compared()
    p99_ttft_ms: float = compared()
    mean_tpot_ms: float = compared()
    median_tpot_ms: float = compared()
    std_tpot_ms: float = compared()
    p50_tpot_ms: float = compared()
    p90_tpot_ms: float = compared()
    p99_tpot_ms: float = compared()
    mean_itl_ms: float = compared()
    median_itl_ms: float = compared()
    std_itl_ms: float = compared()
    p50_itl_ms: float = compared()
    p90_itl_ms: float = compared()
    p99_itl_ms: float = compared()
    mean_e2el_ms: float = compared()
    median_e2el_ms: float = compared()
    std_e2el_ms: float = compared()
    p50_e2el_ms: float = compared()
    p90_e2el_ms: float = compared()
    p99_e2el_ms: float = compared()


def _latency_statistics(name: str, seconds: list[float]) -> dict[str, float]:
    """The `{statistic}_{name}_ms` fields of one latency metric."""
    values_ms = np.asarray(seconds or [0.0]) * 1000
    return {f"mean_{name}_ms": float(values_ms.mean()), f"median_{name}_ms": float(np.median(values_ms)),
            f"std_{name}_ms": float(values_ms.std()),
            **{f"p{p}_{name}_ms": float(np.percentile(values_ms, p)) for p in PERCENTILES}}


def calculate_metrics(outputs: list[RequestOutput], duration_s: float) -> BenchmarkMetrics:
    """vLLM-style metrics of one benchmark level."""
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    latencies = {}
    for name, seconds in samples.items():
        latencies |= _latency_statistics(name, seconds)
    return BenchmarkMetrics(
        duration=duration_s, completed=len(done), failed=len(outputs) - len(done),
        total_input_tokens=total_input, total_output_tokens=total_output,
        request_throughput=len(done) / duration_s, output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s, **latencies,
    )


def compared_ratios(value, baseline) -> dict[str, float]:
    """value / baseline, two instances of one dataclass, for each field declared compared() where both are known and
    the baseline's is not 0."""
    ratios = {}
    for item in dataclasses.fields(value):
        mine, theirs = getattr(value, item.name), getattr(baseline, item.name)
        if item.metadata.get("compared") and theirs and mine is not None:
            ratios[item.name] = mine / theirs
    return ratios


def cost_per_million_output_tokens(hour_price: float, output_throughput: float) -> float | None:
    """Dollars per million output tokens for hardware rented at `hour_price` dollars an hour."""
    if output_throughput <= 0:
        return None
    return hour_price / 3600 / output_throughput * 1e6
