"""Run a command whose whole process group dies with the process that started it, however that dies.

`python process_guard.py LIFELINE_FD GRACE_S COMMAND...` is started as the leader of a new process
group (start_new_session=True) by its owner, with LIFELINE_FD the read end of a pipe whose write
end only the owner holds. It forks a watchdog, then becomes COMMAND (exec: COMMAND keeps the pid,
so the owner waits on it and reads its exit code as before). The watchdog blocks on the lifeline,
which reaches end-of-file when the owner dies, by any signal, kill -9 included: the kernel closes a
dead process's descriptors. Then, or on SIGTERM, SIGHUP or SIGINT, it SIGTERMs the whole group
(COMMAND's own children too: vLLM's engine and worker processes), SIGKILLs what is left after
GRACE_S seconds, and exits. Nothing slips between: the watchdog is there before COMMAND starts,
and an owner that died earlier left the lifeline at end-of-file already.

A pipe rather than PR_SET_PDEATHSIG: that fires when the owner's *thread* that started the child
ends, and would stop a server started from a short-lived thread. Standard library only: it runs
under the owner's Python, which need not have vLLM.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)

POLL_S = 0.2
KILL_WAIT_S = 10  # how long SIGKILLed processes get to vanish (they can be stuck in the kernel, e.g. in a GPU driver)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def group_members(group: int) -> set[int]:
    """The running processes of a process group (zombies do not count: they are dead, waiting to be reaped)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.add(int(stat.parent.name))
    return members


def process_group_alive(group: int) -> bool:
    return bool(group_members(group))


def _wait_gone(group: int, timeout_s: float, spare: int | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_members(group) - {spare}:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def terminate_group(group: int, grace_s: float, spare: int | None = None) -> bool:
    """SIGTERM every process of `group`, SIGKILL those left after grace_s, and wait until they are gone.

    `spare`: a member to leave alone (the caller, when it is one). True when no other is left.
    """
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if _wait_gone(group, grace_s, spare):
        return True
    log.warning("processes of group %d survived SIGTERM for %g s; killing them", group, grace_s)
    for pid in group_members(group) - {spare}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return _wait_gone(group, KILL_WAIT_S, spare)


class _Stop(Exception):
    """A stop signal, raised out of the watchdog's wait."""


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _raise_stop(signum, frame):
    _ignore_stop_signals()  # once: our own SIGTERM to the group comes back to us
    raise _Stop(signal.Signals(signum).name)


def _watch(lifeline: int, grace_s: float) -> NoReturn:
    """The watchdog: wait for the owner's death or a stop signal, then clear the group, spare itself, and exit."""
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        os.read(lifeline, 1)  # the owner never writes: this returns at end-of-file
        _ignore_stop_signals()
        why = "its owner is gone"
    except _Stop as e:
        why = f"{e} received"
    group = os.getpgrp()
    log.warning("stopping process group %d: %s", group, why)
    if not terminate_group(group, grace_s, spare=os.getpid()):
        log.error("processes of group %d are still running after SIGKILL", group)
    logging.shutdown()
    os._exit(0)  # a forked child: no cleanup of the parent's state


def main() -> None:
    logging.basicConfig(format="process guard: %(message)s")
    lifeline, grace_s, *command = sys.argv[1:]
    if os.getpgrp() != os.getpid():  # it would stop its owner's group
        sys.exit("process guard: start it as the leader of a new process group (start_new_session=True)")
    # Blocked until the watchdog's handlers are in place, so that no stop signal is lost or kills it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if os.fork() == 0:
        _watch(int(lifeline), float(grace_s))
    os.close(int(lifeline))
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the mask survives exec
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
