"""A tiny saved policy, a prompts file, and a ``flan-rlhf label`` server in a subprocess, for the labelling tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT, PROMPTS, TINY_T5

LABEL_PROMPTS = PROMPTS[:8]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random FLAN-T5-architecture model with the ByT5 tokenizer, saved as a Hugging Face folder."""
    from transformers import ByT5Tokenizer

    from flan_rlhf.policy import build_t5_from_config

    folder = tmp_path_factory.mktemp("tiny_policy")
    tokenizer = ByT5Tokenizer()
    build_t5_from_config(len(tokenizer), **TINY_T5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in LABEL_PROMPTS))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LabelServer:
    """``flan-rlhf label ... --port P`` in a subprocess; ``url`` once it answers."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
