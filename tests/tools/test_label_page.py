"""The labelling app's routes: validation, refusals, the token, and the page itself."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from flan_rlhf.tools.label_page import LOOPBACK_NAMES, TOKEN_HEADER, create_app, host_name, is_loopback
from flan_rlhf.label_store import LabelStore
from tests.test_label_store import A, B, pair_rows


@pytest.fixture
def store(tmp_path):
    labels = LabelStore(f"sqlite:///{tmp_path}/labels.db", create=True)
    labels.add_pairs(pair_rows(3))
    yield labels
    labels.close()


def test_next_label_undo_round_trip(store):
    client = TestClient(create_app(store, default_labeller="ann"))
    served = client.get("/api/next", params={"client": A}).json()
    assert served["progress"] == {"labelled": 0, "total": 3}
    pair = served["pair"]
    stored = client.post("/api/label", json={"pair_id": pair["pair_id"], "client": A, "choice": "right",
                                             "labeller": "bob", "note": "clearer"})
    assert stored.status_code == 200 and stored.json()["progress"]["labelled"] == 1
    [judgement] = store.judgements()
    assert (judgement["choice"], judgement["labeller"], judgement["note"], judgement["chosen"]) == (
        "right", "bob", "clearer", pair["right"])
    undone = client.post("/api/undo", json={"client": A})
    assert undone.json() == {"undone": pair["pair_id"], "progress": {"labelled": 0, "total": 3}}
    assert client.get("/api/next", params={"client": A}).json()["pair"] == pair


@pytest.mark.parametrize("body, status, message", [
    ({"pair_id": 99, "client": A, "choice": "left", "labeller": "ann"}, 404, "no pair 99"),
    ({"pair_id": 1, "client": A, "choice": "better", "labeller": "ann"}, 422, "choice"),
    ({"pair_id": "one", "client": A, "choice": "left", "labeller": "ann"}, 422, "pair_id"),
    ({"pair_id": 1, "client": "x", "choice": "left", "labeller": "ann"}, 422, "client"),
    ({"pair_id": 1, "client": A, "choice": "left", "labeller": "ann", "score": 3}, 422, "score"),
    ({"pair_id": 1, "client": A, "choice": "left", "labeller": ""}, 422, "labeller"),
    ({"pair_id": 1, "client": B, "choice": "left", "labeller": "ann"}, 409, "not held by this page"),
])
def test_bad_requests_get_one_line_and_write_nothing(store, body, status, message):
    client = TestClient(create_app(store))
    assert client.get("/api/next", params={"client": A}).json()["pair"]["pair_id"] == 1
    response = client.post("/api/label", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and error.endswith("nothing was written") and "\n" not in error
    assert store.judgements() == []


def test_a_replayed_label_is_refused(store):
    client = TestClient(create_app(store))
    pair = client.get("/api/next", params={"client": A}).json()["pair"]
    body = {"pair_id": pair["pair_id"], "client": A, "choice": "left", "labeller": "ann"}
    assert client.post("/api/label", json=body).status_code == 200
    replay = client.post("/api/label", json=body)
    assert replay.status_code == 409 and "already labelled" in replay.json()["error"]
    assert len(store.judgements()) == 1
    assert client.post("/api/label", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422


def test_with_a_token_every_api_request_needs_it(store):
    client = TestClient(create_app(store, token="s3cret-token"))
    assert client.get("/").status_code == 200  # the page holds no data; it asks for the token
    for headers in ({}, {TOKEN_HEADER: "wrong"}):
        refused = client.get("/api/next", params={"client": A}, headers=headers)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert client.post("/api/undo", json={"client": A}, headers=headers).status_code == 401
    served = client.get("/api/next", params={"client": A}, headers={TOKEN_HEADER: "s3cret-token"})
    assert served.status_code == 200 and served.json()["pair"]["pair_id"] == 1


def test_the_page_carries_the_default_labeller_escaped(store):
    page = TestClient(create_app(store, default_labeller='</script><b>"x')).get("/").text
    assert 'const DEFAULT_LABELLER = "\\u003c/script\\u003e\\u003cb\\u003e\\"x";' in page
    assert "<script>" in page and page.count("</script>") == 1


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("header, name", [("127.0.0.1:8765", "127.0.0.1"), ("localhost", "localhost"),
                                          ("[::1]:8765", "::1"), ("evil.example:80", "evil.example")])
def test_host_name_by_hand(header, name):
    assert host_name(header) == name


def test_on_loopback_only_loopback_names_are_answered(store):
    """A page whose domain an attacker rebinds to 127.0.0.1 (DNS rebinding) names its own host: refused."""
    client = TestClient(create_app(store, allowed_hosts=LOOPBACK_NAMES))
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        assert client.get("/api/next", params={"client": A}, headers={"Host": host}).status_code == 200
    refused = client.get("/api/next", params={"client": A}, headers={"Host": "evil.example:8765"})
    assert refused.status_code == 400 and "answers only to" in refused.json()["error"]
    body = {"pair_id": 1, "client": A, "choice": "left", "labeller": "ann"}
    assert client.post("/api/label", json=body, headers={"Host": "evil.example"}).status_code == 400
    assert store.judgements() == []


def test_a_body_not_sent_as_json_is_refused(store):
    """A cross-site HTML form can post text/plain but not application/json: such a body writes nothing."""
    import json

    client = TestClient(create_app(store))
    pair = client.get("/api/next", params={"client": A}).json()["pair"]
    body = json.dumps({"pair_id": pair["pair_id"], "client": A, "choice": "left", "labeller": "ann"})
    response = client.post("/api/label", content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 422 and store.judgements() == []


def test_a_failing_database_is_a_503_line_and_the_label_is_not_stored(store, tmp_path):
    import sqlite3

    client = TestClient(create_app(store))
    pair = client.get("/api/next", params={"client": A}).json()["pair"]
    store_insert = store.engine.dialect.do_execute

    def full_disk(cursor, statement, parameters, context=None):
        if statement.startswith("INSERT INTO labels"):
            raise sqlite3.OperationalError("database or disk is full")
        return store_insert(cursor, statement, parameters, context)

    store.engine.dialect.do_execute = full_disk
    try:
        response = client.post("/api/label", json={"pair_id": pair["pair_id"], "client": A, "choice": "left",
                                                   "labeller": "ann"})
    finally:
        store.engine.dialect.do_execute = store_insert
    assert response.status_code == 503
    assert "database or disk is full" in response.json()["error"] and "nothing was written" in response.json()["error"]
    assert store.judgements() == []
    retried = client.post("/api/label", json={"pair_id": pair["pair_id"], "client": A, "choice": "left", "labeller": "ann"})
    assert retried.status_code == 200 and len(store.judgements()) == 1  # the pair is still this page's
