"""Fixtures for the remote tests: moto's S3 server on a loopback port (dummy credentials, no network beyond this
machine), a fresh bucket per test, and a backend wrapper that counts (or fails) uploads.

    python _remote_support.py push STORE URL MODEL DELAY     push MODEL to URL, sleeping DELAY s per chunk upload
                                                           (the interrupted-push test kills it midway); prints
                                                           the report as JSON
The S3 endpoint and credentials reach child processes through the environment (AWS_ENDPOINT_URL_S3, ...).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid

import pytest

from modelpress.store import Store
from modelpress.store.backend import ObjectStore
from modelpress.store.remote import Remote
from modelpress.store.remote_push import push

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _atomic_conditional_puts():
    """moto (5.2) checks a PUT's If-Match / If-None-Match and then writes, with no lock between: under load two
    racing conditional PUTs can both pass, which S3 itself never allows. Serialise moto's PUT handler so that the
    tests exercise our compare-and-swap, not moto's race. Returns the undo."""
    responses = pytest.importorskip("moto.s3.responses")
    original = getattr(responses.S3Response, "put_object", None)
    if original is None:
        return lambda: None
    lock = threading.Lock()

    def put_object(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    responses.S3Response.put_object = put_object
    return lambda: setattr(responses.S3Response, "put_object", original)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in this process, on 127.0.0.1 and a free port; its URL."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    undo = _atomic_conditional_puts()
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL_S3")}
    os.environ.update(_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    try:
        yield os.environ["AWS_ENDPOINT_URL_S3"]
    finally:
        server.stop()
        undo()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh bucket on the moto server; the remote's URL (a prefix in it)."""
    import s3fs

    bucket = f"mp-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/models"


class Counting(ObjectStore):
    """Wraps a backend: records every chunk key put (and read), and raises after `fail_after` chunk uploads
    (`fail_gets_after` chunk reads), if set."""

    def __init__(self, inner: ObjectStore, fail_after: int | None = None, delay: float = 0.0,
                 fail_gets_after: int | None = None):
        self.inner, self.fail_after, self.delay, self.fail_gets_after = inner, fail_after, delay, fail_gets_after
        self.can_map = False
        self.puts: list[str] = []
        self.gets: list[str] = []  # chunk keys read
        self._lock = threading.Lock()

    def get(self, key, limit):
        if key.startswith("chunks/"):
            with self._lock:
                if self.fail_gets_after is not None and len(self.gets) >= self.fail_gets_after:
                    raise ConnectionError("injected: the network went away")
                self.gets.append(key)
        return self.inner.get(key, limit)

    def get_range(self, key, start, length):
        return self.inner.get_range(key, start, length)

    def get_tagged(self, key, limit):
        return self.inner.get_tagged(key, limit)

    def put_if_match(self, key, data, tag):
        return self.inner.put_if_match(key, data, tag)

    def _count(self, key):
        if key.startswith("chunks/"):
            with self._lock:
                if self.fail_after is not None and len([k for k in self.puts if k.startswith("chunks/")]) >= \
                        self.fail_after:
                    raise ConnectionError("injected: the network went away")
                self.puts.append(key)
            if self.delay:
                time.sleep(self.delay)
        else:
            self.puts.append(key)

    def put(self, key, parts):
        self._count(key)
        self.inner.put(key, parts)

    def put_if_absent(self, key, parts):
        self._count(key)
        return self.inner.put_if_absent(key, parts)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)

    def remove_stale_temporaries(self, older_than):
        return self.inner.remove_stale_temporaries(older_than)


def counting_remote(url: str, **kw) -> tuple[Remote, Counting]:
    inner = Remote(url)
    wrapped = Counting(inner.backend, **kw)
    return Remote(url, backend=wrapped), wrapped


def chunk_puts(counter: Counting) -> list[str]:
    return [k for k in counter.puts if k.startswith("chunks/")]


def _main(argv: list[str]) -> int:
    if argv[0] == "push":
        store_dir, url, model, delay = argv[1:5]
        remote, _ = counting_remote(url, delay=float(delay))
        remote.threads = 1
        with Store(store_dir) as store:
            report = push(store, remote, model)
        print(json.dumps({"sent": report.chunks_sent, "skipped": report.chunks_skipped}))
        return 0
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
