"""An OpenAI-API client for vLLM servers: streamed benchmark requests that never raise, and plain JSON calls.

The request coroutine follows vLLM's `benchmarks/lib/endpoint_request_func.py`: it streams, so the
first chunk's arrival is the time to first token and later arrivals give inter-token latencies,
and anything that goes wrong is recorded on the output as data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp

from deploy.metrics import RequestOutput
from wanda_serve.errors import WandaServeError

REQUEST_TIMEOUT_S = 600


class ServerRequestFailed(WandaServeError):
    """A plain (non-benchmark) request to the server failed."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # http://host:port
    model: str  # the name the server serves the model under
    api_key: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Request:
    prompt_token_ids: tuple[int, ...]
    output_len: int


def completion_payload(endpoint: Endpoint, request: Request, stream: bool) -> dict:
    # Greedy, and end-of-sequence ignored: every model produces exactly output_len tokens, so the
    # dense and the pruned model do the same work whatever they say.
    payload = {
        "model": endpoint.model,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return payload


async def stream_completion(session: aiohttp.ClientSession, endpoint: Endpoint, request: Request) -> RequestOutput:
    """One streamed completion; failures are recorded on the output, never raised."""
    output = RequestOutput(prompt_len=len(request.prompt_token_ids))
    start = last = time.perf_counter()
    output.start_time = start
    try:
        async with session.post(f"{endpoint.base_url}/v1/completions", json=completion_payload(endpoint, request, True),
                                headers=endpoint.headers()) as response:
            if response.status != 200:
                output.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return output
            finished = False
            async for line in response.content:
                line = line.strip()
                if line == b"data: [DONE]":
                    finished = True
                    break
                if not line.startswith(b"data: "):
                    continue  # blank separators and SSE comments (pings)
                data = json.loads(line[len(b"data: "):])
                if data.get("choices"):
                    now = time.perf_counter()
                    if output.ttft == 0.0:
                        output.ttft = now - start
                    else:
                        output.itl.append(now - last)
                    last = now
                elif usage := data.get("usage"):
                    output.output_tokens = usage.get("completion_tokens", 0)
                    output.prompt_len = usage.get("prompt_tokens", output.prompt_len)
                elif "error" in data:  # vLLM reports errors inside an open stream this way
                    output.error = f"error in the stream: {json.dumps(data['error'])[:200]}"
                    return output
        if output.ttft == 0.0:
            output.error = "the stream ended without a token"
        elif not finished:
            output.error = "the stream was cut before [DONE]"
        else:
            output.latency = last - start
            output.success = True
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        output.error = f"{type(e).__name__}: {e}"
    return output


async def _run_level(endpoint: Endpoint, requests: list[Request], concurrency: int | None) -> tuple[list[RequestOutput], float]:
    limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)  # the semaphore is the only limit on concurrency

    async def limited(session, request):
        async with limit:
            return await stream_completion(session, endpoint, request)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        outputs = await asyncio.gather(*(limited(session, r) for r in requests))
        return list(outputs), time.perf_counter() - start


def run_level(endpoint: Endpoint, requests: list[Request], concurrency: int | None) -> tuple[list[RequestOutput], float]:
    """Send all requests at once, at most `concurrency` in flight (None: no cap). Returns outputs and wall seconds."""
    return asyncio.run(_run_level(endpoint, requests, concurrency))


def call_json(base_url: str, path: str, payload: dict | None = None, api_key: str | None = None, timeout_s: float = 60) -> dict:
    """GET (payload None) or POST JSON; the parsed reply. Raises ServerRequestFailed with the server's reason."""
    request = urllib.request.Request(
        f"{base_url}{path}", data=None if payload is None else json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {}),
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise ServerRequestFailed(f"{base_url}{path} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerRequestFailed(f"{base_url}{path} did not answer: {getattr(e, 'reason', e)}") from e
    return json.loads(body) if body.strip() else {}


def served_model(base_url: str, api_key: str | None = None) -> dict:
    """The first entry of /v1/models: `id` is the name to request, `root` where vLLM loaded it from."""
    models = call_json(base_url, "/v1/models", api_key=api_key).get("data") or []
    if not models:
        raise ServerRequestFailed(f"{base_url}/v1/models lists no model")
    return models[0]


def greedy_token_ids(endpoint: Endpoint, request: Request) -> list[int]:
    """The server's greedy continuation of one prompt, as token ids."""
    payload = completion_payload(endpoint, request, stream=False) | {"return_token_ids": True}
    reply = call_json(endpoint.base_url, "/v1/completions", payload, endpoint.api_key, timeout_s=REQUEST_TIMEOUT_S)
    return list(reply["choices"][0]["token_ids"])
