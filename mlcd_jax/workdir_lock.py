"""One run per workdir: ``DIR/lock.json`` names the trainer, evaluator or study that holds ``DIR``.

Two processes writing one workdir replace each other's ``config.json``, metrics and checkpoints, and both
report success. The holder writes ``{host, pid, command, started, heartbeat}`` and refreshes the
heartbeat every :data:`HEARTBEAT_S`; a second process refuses in one ``ConfigError`` line naming the
holder. A lock whose holder is gone (a pid no longer alive on this host, or a heartbeat older than
:data:`STALE_AFTER_S`: another host that died) is taken over with a printed notice. Locally the file is
created exclusively (``O_EXCL``); an object store (``gs://``) has no exclusive create through fsspec, so
the lock is written and read back, and the holder whose token is there wins. In a multi-process run
process 0 takes the lock and tells the others whether it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

from mlcd_jax import fileio
from mlcd_jax.config_lib import ConfigError

LOCK_NAME = "lock.json"
HEARTBEAT_S = 60.0  # how often the holder refreshes its heartbeat
STALE_AFTER_S = 600.0  # a heartbeat older than this is a holder that died (on any host)


def check_writable(workdir: str) -> None:
    """Creates ``workdir``; a path that is a file, or a directory this process cannot write, is one
    ConfigError line before anything runs."""
    try:
        fileio.makedirs(workdir)
        if not fileio.is_remote(workdir):
            with tempfile.TemporaryFile(dir=workdir):
                pass
    except OSError as err:
        raise ConfigError(f"--workdir={workdir} is not a writable directory ({err.strerror or err})") from None


def _read(path: epath.Path) -> dict[str, Any] | None:
    """The lock's record, None when there is none; a torn or foreign file reads as a dead holder."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(record: dict[str, Any]) -> bool:
    """Whether the holder may still run: a live pid on this host with a fresh heartbeat, or, on another
    host, a heartbeat younger than :data:`STALE_AFTER_S`."""
    if not record or time.time() - float(record.get("heartbeat", 0)) > STALE_AFTER_S:
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True  # another user's process, or a record without a pid that is still heartbeating
    return True


def describe(record: dict[str, Any]) -> str:
    """``train pid 123 on host h since 2026-12-06 19:01:33 UTC`` for messages."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("started", 0))))
    who = f"{record.get('command', '?')} pid {record.get('pid', '?')}"
    return f"{who} on host {record.get('host', '?')} since {started}"


class WorkdirLock:
    """The lock of one workdir held by this process (see the module docstring)."""

    def __init__(self, workdir: str, command: str) -> None:
        self.path = epath.Path(workdir) / LOCK_NAME
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": now,
                       "heartbeat": now, "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        """Writes the record if no lock file exists; True when this process now holds the lock."""
        data = json.dumps(self.record)
        if fileio.is_remote(self.path):
            if self.path.exists():
                return False
            self.path.write_text(data)
            return (_read(self.path) or {}).get("token") == self.record["token"]
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one with a notice; a live holder is a ConfigError."""
        for _ in range(3):  # another process may take over the same stale lock between the read and the create
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
                self._thread.start()
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released in between
            if _alive(holder):
                raise ConfigError(f"{self.path.parent} is in use by {describe(holder)} (its {LOCK_NAME}): wait "
                                  f"for it to finish or use another workdir; if that process is gone, delete "
                                  f"{self.path}")
            print(f"notice: taking over the stale lock of {describe(holder) if holder else 'an unreadable lock'} "
                  f"({self.path}): that process is gone", file=sys.stderr, flush=True)
            self.path.unlink(missing_ok=True)
        raise ConfigError(f"{self.path}: another process keeps taking this workdir's lock; use another workdir")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (_read(self.path) or {}).get("token") != self.record["token"]:
                return  # taken over: nothing of ours to refresh
            self.record["heartbeat"] = time.time()
            try:
                fileio.write_atomic(self.path, json.dumps(self.record))
            except OSError:  # a full disk or a store hiccup: the next beat tries again
                continue

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (_read(self.path) or {}).get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: str, command: str, *, create: bool = True) -> Iterator[None]:
    """Holds ``workdir``'s lock for the block (process 0 of a multi-process run; every process learns
    whether it got it). With ``create`` the workdir is made first; without (evaluation), a workdir that
    does not exist is not locked: there is nothing in it to protect."""
    import jax

    lock = None
    error: ConfigError | None = None
    if jax.process_index() == 0:
        try:
            if create:
                check_writable(workdir)
            if create or epath.Path(workdir).exists():
                lock = WorkdirLock(workdir, command)
                lock.acquire()
        except ConfigError as err:
            lock, error = None, err
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = ConfigError(f"process 0 could not take the lock of {workdir} (its stderr says why)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
