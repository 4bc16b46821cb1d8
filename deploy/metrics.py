"""Benchmark metrics: a pure function from request outputs to the numbers `vllm bench serve` reports.

Definitions follow vLLM's `benchmarks/serve.py` so the two can be put side by side: TTFT is the
time to the first streamed chunk, ITL the gaps between later chunks, TPOT (latency − TTFT) /
(output tokens − 1) per request, and throughputs count completed requests over the wall time of
the level. Failed requests are counted, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


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


def calculate_metrics(outputs: list[RequestOutput], duration_s: float, percentiles=PERCENTILES) -> dict:
    """vLLM-style metrics of one benchmark level, as a flat dict with vLLM's field names (`_ms` in milliseconds)."""
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    metrics = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name in LATENCY_METRICS:
        values_ms = np.asarray(samples[name] or [0.0]) * 1000
        metrics[f"mean_{name}_ms"] = float(values_ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(values_ms))
        metrics[f"std_{name}_ms"] = float(values_ms.std())
        for p in percentiles:
            metrics[f"p{p}_{name}_ms"] = float(np.percentile(values_ms, p))
    return metrics


def cost_per_million_output_tokens(hour_price: float, output_throughput: float) -> float | None:
    """Dollars per million output tokens for hardware rented at `hour_price` dollars an hour."""
    if output_throughput <= 0:
        return None
    return hour_price / 3600 / output_throughput * 1e6
