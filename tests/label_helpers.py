"""A ``flan-rlhf label`` server in a subprocess and requests to its API, for the labelling tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import CHECKOUT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LabelServer:
    """``flan-rlhf label ... --port P`` in a subprocess; ``url`` once it answers."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "flan_rlhf.cli", "label", *args,
                                             "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                            cwd=CHECKOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"label server exited: {log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"label server did not answer in 120 s: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def api(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """``(status, JSON body)`` of one request to the labelling API."""
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
