"""``flan-rlhf label``: sampling into the store, restarts, export, bad input, two clients and a kill."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from flan_rlhf.label_store import LabelStore
from tests.conftest import PROMPTS, error_lines, run_command
from tests.label_helpers import LabelServer, api

LABEL_PROMPTS = PROMPTS[:8]
SAMPLE = ("--max_new_tokens", "12", "--serve", "false")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in LABEL_PROMPTS))
    return path


def test_sampling_fills_the_store_once_and_a_restart_samples_nothing(tmp_path, tiny_model_dir, prompts_file):
    url = f"sqlite:///{tmp_path}/labels.db"
    code, out, err = run_command("label", "--store", url, "--data", str(prompts_file), "--model", tiny_model_dir, *SAMPLE)
    assert code == 0, err[-2000:]
    store = LabelStore(url)
    total = store.progress()["total"]
    assert total == len(LABEL_PROMPTS)  # a random policy samples two different byte strings
    assert f"label: {total} new pairs; 0 of {total} labelled" in out
    pairs = [store.next_pair(f"client{i:04d}") for i in range(total)]
    assert sorted(pair.prompt for pair in pairs) == sorted(LABEL_PROMPTS)
    assert all(pair.left != pair.right for pair in pairs)
    code, out, _ = run_command("label", "--store", url, "--data", str(prompts_file), "--model", tiny_model_dir, *SAMPLE)
    assert code == 0 and f"label: 0 new pairs; 0 of {total} labelled" in out
    assert store.progress()["total"] == total
    code, out, _ = run_command("label", "--store", url, "--data", str(prompts_file), "--model", tiny_model_dir,
                               "--seed", "1", *SAMPLE)  # another decoding seed is another source: new pairs
    assert code == 0 and store.progress()["total"] == 2 * total


def test_two_policies_make_one_response_each(tmp_path, tiny_model_dir, prompts_file):
    url = f"sqlite:///{tmp_path}/labels.db"
    code, _, err = run_command("label", "--store", url, "--data", str(prompts_file), "--model", tiny_model_dir,
                               "--model_b", tiny_model_dir, "--temperature", "0.5", "--max_prompts", "3", *SAMPLE)
    assert code == 0, err[-2000:]
    store = LabelStore(url)
    for i in range(3):
        pair = store.next_pair(f"client{i:04d}")
        store.add_label(pair.id, f"client{i:04d}", "left", "ann")
    judgements = store.judgements()
    assert len(judgements) == 3
    for judgement in judgements:
        assert judgement["source_a"]["draw"] == judgement["source_b"]["draw"] == 1
        assert judgement["source_a"]["temperature"] == 0.5 and judgement["source_a"]["model"] == tiny_model_dir


def test_export_round_trips_the_preferences(tmp_path):
    url = f"sqlite:///{tmp_path}/labels.db"
    store = LabelStore(url, create=True)
    store.add_pairs([{"prompt": f"p{i}", "response_a": f"kind {i}", "response_b": f"rude {i}",
                      "source_a": {}, "source_b": {"draw": 2}} for i in range(4)], seed=1)
    for i, choice in enumerate(["left", "right", "tie", "left"]):
        pair = store.next_pair("clientAAAA")
        store.add_label(pair.id, "clientAAAA", choice, "ann")
    out_file = tmp_path / "pairs.jsonl"
    code, out, err = run_command("label", "--store", url, "--export", str(out_file))
    assert code == 0, err
    assert "exported 3 preference pairs" in out and "1 ties" in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows == [{"prompt": j["prompt"], "chosen": j["chosen"], "rejected": j["rejected"]}
                    for j in store.judgements() if j["choice"] != "tie"]
    code, _, err = run_command("label", "--store", url, "--export", str(out_file))  # never overwritten unasked
    assert code == 2 and "already exists - pass --overwrite true" in error_lines(err)[0]
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == rows
    database = (tmp_path / "labels.db").read_bytes()
    code, _, err = run_command("label", "--store", url, "--export", str(tmp_path / "labels.db"), "--overwrite", "true")
    assert code == 2 and "would write over the label store itself" in error_lines(err)[0]
    assert (tmp_path / "labels.db").read_bytes() == database


@pytest.mark.parametrize("args, message", [
    (["--store", "labels.db", "--serve", "false", "--data", "x.jsonl"], "not a database URL"),
    (["--store", "sqlite:///{tmp}/none.db", "--export", "{tmp}/p.jsonl"], "no label store at"),
    (["--store", "sqlite:///{tmp}/l.db", "--serve", "false"], "nothing to do"),
    (["--store", "sqlite:///{tmp}/l.db", "--serve", "false", "--data", "{tmp}/missing.jsonl", "--model", "m"],
     "does not exist"),
    (["--store", "sqlite:///{tmp}/l.db", "--serve", "false", "--data", "{prompts}"], "--data needs --model"),
    (["--store", "sqlite:///{tmp}/l.db"], "no label store at"),
    (["--store", "sqlite:///{tmp}/empty.db", "--model", "m"], "add --data prompts.jsonl"),
    (["--store", "sqlite:///{tmp}/empty.db"], "holds no pairs to label"),
    (["--store", "sqlite:///{tmp}/l.db", "--serve", "false", "--data", "{prompts}", "--model", "m", "--top_p", "2"],
     "top_p"),
])
def test_bad_input_is_one_line_with_status_2(tmp_path, prompts_file, args, message):
    LabelStore(f"sqlite:///{tmp_path}/empty.db", create=True).close()
    args = [arg.format(tmp=tmp_path, prompts=prompts_file) for arg in args]
    code, _, err = run_command("label", *args)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert not (tmp_path / "l.db").exists() and not (tmp_path / "none.db").exists()  # nothing made for nothing


def test_a_taken_port_is_one_line(tmp_path):
    import socket

    url = f"sqlite:///{tmp_path}/l.db"
    LabelStore(url, create=True).add_pairs([{"prompt": "p", "response_a": "a", "response_b": "b",
                                             "source_a": {}, "source_b": {}}])
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, _, err = run_command("label", "--store", url, "--port", str(taken.getsockname()[1]))
    assert code == 2 and "pass another --port" in error_lines(err)[0]


def test_two_clients_over_http_lose_nothing_and_never_share_a_pair(tmp_path):
    url = f"sqlite:///{tmp_path}/labels.db"
    store = LabelStore(url, create=True)
    store.add_pairs([{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}", "source_a": {},
                      "source_b": {}} for i in range(40)])
    server = LabelServer(["--store", url], tmp_path / "server.log")
    acknowledged: dict[str, list[int]] = {"clientAAAA": [], "clientBBBB": []}
    start = threading.Barrier(2)
    try:
        def labeller(client: str) -> None:
            start.wait()
            while True:
                status, served = api(f"{server.url}/api/next?client={client}")
                assert status == 200
                if served["pair"] is None:
                    return
                pair_id = served["pair"]["pair_id"]
                status, body = api(f"{server.url}/api/label", "POST", {"pair_id": pair_id, "client": client,
                                                                       "choice": "right", "labeller": client})
                assert status == 200, body
                acknowledged[client].append(pair_id)

        threads = [threading.Thread(target=labeller, args=(client,)) for client in acknowledged]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        server.stop()
    mine, theirs = acknowledged.values()
    assert len(mine) > 3 and len(theirs) > 3, acknowledged
    assert not set(mine) & set(theirs)  # never the same pair to both
    stored = {j["id"]: j["client"] for j in store.judgements()}
    assert stored == {**{i: "clientAAAA" for i in mine}, **{i: "clientBBBB" for i in theirs}}
    assert len(stored) == 40


def test_a_killed_server_keeps_every_acknowledged_label_and_restarts_where_it_was(tmp_path, tiny_model_dir,
                                                                                   prompts_file):
    url = f"sqlite:///{tmp_path}/labels.db"
    args = ["--store", url, "--data", str(prompts_file), "--model", tiny_model_dir, "--max_new_tokens", "12"]
    server = LabelServer(args, tmp_path / "server.log")
    client = "clientKILL"
    acknowledged: list[int] = []
    stop = threading.Event()

    def label_until_killed() -> None:
        while not stop.is_set():
            try:
                status, served = api(f"{server.url}/api/next?client={client}")
                pair = served["pair"]
                status, _ = api(f"{server.url}/api/label", "POST", {"pair_id": pair["pair_id"], "client": client,
                                                                    "choice": "left", "labeller": "ann"})
            except (OSError, TypeError):  # the server is gone mid-request
                return
            if status == 200:
                acknowledged.append(pair["pair_id"])
            if len(acknowledged) == 5:
                return

    labelling = threading.Thread(target=label_until_killed)
    labelling.start()
    while len(acknowledged) < 3 and labelling.is_alive():
        time.sleep(0.01)
    server.process.send_signal(signal.SIGKILL)  # mid-label: the client is still posting
    server.process.wait(timeout=30)
    stop.set()
    labelling.join(timeout=30)
    assert len(acknowledged) >= 3
    stored = [j["id"] for j in LabelStore(url).judgements()]
    assert set(acknowledged) <= set(stored) and len(stored) <= len(acknowledged) + 1  # at most the one in flight

    restarted = LabelServer(args, tmp_path / "server.log")
    try:
        log = (tmp_path / "server.log").read_text()
        assert log.count(f"label: sampled {len(LABEL_PROMPTS)} pairs") == 1  # the restart sampled nothing
        status, served = api(f"{restarted.url}/api/next?client={client}")
        assert status == 200 and served["progress"] == {"labelled": len(stored), "total": len(LABEL_PROMPTS)}
        assert served["pair"]["pair_id"] not in stored
    finally:
        restarted.stop()  # SIGTERM, as a scheduler stops it: one line, exit 143
    assert restarted.process.returncode == 143
    assert (tmp_path / "server.log").read_text().rstrip().endswith(
        "stopped by SIGTERM while serving the labelling page; no file was left half-written (writes are atomic) - "
        "every label given is saved; the same command serves the rest")


def test_the_token_can_come_from_the_environment(tmp_path):
    url = f"sqlite:///{tmp_path}/labels.db"
    LabelStore(url, create=True).add_pairs([{"prompt": "p", "response_a": "a", "response_b": "b",
                                             "source_a": {}, "source_b": {}}])
    server = LabelServer(["--store", url], tmp_path / "server.log", env={"FLAN_RLHF_LABEL_TOKEN": "from-env-token"})
    try:
        assert api(f"{server.url}/api/next?client=clientAAAA")[0] == 401
        status, served = api(f"{server.url}/api/next?client=clientAAAA", headers={"X-Label-Token": "from-env-token"})
        assert status == 200 and served["pair"]["prompt"] == "p"
    finally:
        server.stop()
    assert "from-env-token" not in (tmp_path / "server.log").read_text()  # not printed: its owner set it


def test_a_pair_of_the_same_text_is_drawn_again(monkeypatch):
    """``b`` responses equal to their ``a`` are drawn again, each redraw with its own seed, only for those prompts."""
    import torch

    from flan_rlhf.settings import GenerationSettings
    from flan_rlhf.tools import label

    calls = []
    scripted = {0: ["x", "y", "z", "x", "q", "z"],  # the first call: a then b for 3 prompts; prompts 0 and 2 the same
                2: ["x", "w"],                      # redraw 1 of prompts 0 and 2: prompt 0 still the same
                3: ["v"]}                           # redraw 2 of prompt 0

    def fake_generate_ids(net, tokenizer, prompts, generation, **kwargs):
        offset = int(torch.initial_seed()) - 7
        calls.append((offset, list(prompts)))
        return scripted[offset]

    monkeypatch.setattr(label, "generate_ids", fake_generate_ids)
    monkeypatch.setattr(label, "decode", lambda tokenizer, ids: list(ids))
    prompts = ["p0", "p1", "p2"]
    a, b = label.sample_pairs(prompts, ("net", "tok"), None, GenerationSettings(), seed=7, batch_size=4,
                              max_prompt_tokens=32, redraws=2)
    assert (a, b) == (["x", "y", "z"], ["v", "q", "w"])
    assert calls == [(0, prompts + prompts), (2, ["p0", "p2"]), (3, ["p0"])]
    calls.clear()
    scripted[0] = ["x", "y", "z", "x", "q", "z"]
    assert label.sample_pairs(prompts, ("net", "tok"), None, GenerationSettings(), seed=7, batch_size=4,
                              max_prompt_tokens=32, redraws=0) == (["x", "y", "z"], ["x", "q", "z"])
    assert len(calls) == 1
