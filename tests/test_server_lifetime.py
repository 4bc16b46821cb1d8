"""A server never outlives the process that started it: deploy/process_guard.py, with the fake vLLM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import deploy.vllm_server
from deploy import process_guard
from deploy.process_guard import process_group_alive
from deploy.vllm_server import ServerSettings, VllmServer


def seconds_until(condition, timeout_s: float) -> float:
    """Seconds until condition() holds; fails after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def port_free(port: int) -> bool:
    """Whether a new server could listen on the port (connections in TIME_WAIT do not count, as for vLLM)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_the_server_dies_with_the_serve_command(fake_vllm, tiny_model_dir, tmp_path, signum, leftovers):
    command = [sys.executable, "-m", "wanda_serve", "serve", str(tiny_model_dir), "--run-dir", str(tmp_path)]
    cli_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    leftovers(cli_process.pid)
    first_line = cli_process.stdout.readline()
    port = int(first_line.split(" at http://127.0.0.1:")[1].split("/")[0])
    server_group = int(next(line for line in (tmp_path / "vllm-server.log").read_text().splitlines()
                            if line.startswith("pgid ")).split()[1])
    leftovers(server_group)
    assert process_group_alive(server_group) and not port_free(port)
    assert len(process_guard.group_members(server_group)) == 3  # the server, its "engine" child and the watchdog
    cli_process.send_signal(signum)
    cli_process.wait(timeout=40)
    seconds_until(lambda: not process_group_alive(server_group) and port_free(port), timeout_s=10)
    assert "process guard: stopping process group" in (tmp_path / "vllm-server.log").read_text()


def test_stop_kills_a_server_that_ignores_sigterm(fake_vllm, tiny_model_dir, tmp_path, monkeypatch, caplog):
    fake_vllm(mode="stubborn")
    monkeypatch.setattr(deploy.vllm_server, "STOP_GRACE_S", 1)
    server = VllmServer(tiny_model_dir, tmp_path / "server.log", ServerSettings())
    with server:
        group = server.process.pid
        start = time.monotonic()
    assert 1 <= time.monotonic() - start < 5 and not process_group_alive(group)
    assert f"processes of group {group} survived SIGTERM for 1 s; killing them" in caplog.text


OWNER = """
import os, subprocess, sys
read_end, write_end = os.pipe()
server = subprocess.Popen([sys.executable, {guard!r}, str(read_end), "1", *{command!r}], pass_fds=(read_end,), start_new_session=True)
print(server.pid, flush=True)
server.wait()
"""
# Ignores SIGTERM and has a child that does not: only SIGKILL stops the group.
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")


def test_the_watchdog_kills_what_survives_the_grace_period(leftovers):
    owner_code = OWNER.format(guard=process_guard.__file__, command=[sys.executable, "-c", STUBBORN])
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    leftovers(owner.pid)
    group = int(owner.stdout.readline())
    leftovers(group)
    seconds_until(lambda: len(process_guard.group_members(group)) == 3, timeout_s=10)  # server, its child, watchdog
    owner.kill()
    owner.wait()
    time.sleep(0.5)
    assert group in process_guard.group_members(group)  # SIGTERM did not stop the server
    assert seconds_until(lambda: not process_group_alive(group), timeout_s=10) < 3


def test_the_guard_refuses_to_run_outside_a_group_of_its_own(tmp_path):
    marker = tmp_path / "started"
    read_end, write_end = os.pipe()
    run = subprocess.run([sys.executable, process_guard.__file__, str(read_end), "1", "touch", str(marker)],
                         pass_fds=(read_end,), capture_output=True, text=True)
    os.close(read_end)
    os.close(write_end)
    assert run.returncode == 1 and "start it as the leader of a new process group" in run.stderr and not marker.exists()
