"""The label store: leases, labels, undo, refusals, and two clients at once."""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from flan_rlhf.label_store import (LabelRefused, LabelStore, LabelStoreError, preference_pairs,
                                       winning_response)

A, B = "clientAAAA", "clientBBBB"


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"prompt {i}", "response_a": f"a{i}", "response_b": f"b{i}",
             "source_a": {"model": "m", "draw": 1}, "source_b": {"model": "m", "draw": 2}} for i in range(n)]


#: a server database to run the store's tests on too (its label tables are dropped first), e.g.
#: postgresql+psycopg://postgres@127.0.0.1:5439/labels (docs/development.md#the-label-store-on-a-server-database)
SERVER_URL = os.environ.get("FLAN_RLHF_TEST_DATABASE_URL")


@pytest.fixture(params=["sqlite", "server"])
def store_url(request, tmp_path) -> str:
    """A new, empty store's URL: a SQLite file, and the server database when ``FLAN_RLHF_TEST_DATABASE_URL`` names one."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/labels.db"
    if not SERVER_URL:
        pytest.skip("FLAN_RLHF_TEST_DATABASE_URL names no server database")
    import sqlalchemy as sa

    from flan_rlhf.label_store import metadata

    engine = sa.create_engine(SERVER_URL)
    metadata.drop_all(engine)
    engine.dispose()
    return SERVER_URL


@pytest.fixture
def store(store_url):
    labels = LabelStore(store_url, create=True)
    labels.add_pairs(pair_rows(5), seed=0)
    yield labels
    labels.close()


def test_winning_response_by_hand():
    assert winning_response("left", "a") == "a"
    assert winning_response("left", "b") == "b"
    assert winning_response("right", "a") == "b"
    assert winning_response("right", "b") == "a"
    assert winning_response("tie", "a") is None
    assert winning_response("both_unacceptable", "b") is None


def test_shown_order_is_drawn_per_pair_and_recorded(store_url):
    labels = LabelStore(store_url, create=True)
    labels.add_pairs(pair_rows(40), seed=3)
    shown = [labels.next_pair(f"client{i:06d}") for i in range(40)]
    lefts = [pair.left[0] for pair in shown]
    assert 10 < lefts.count("a") < 30  # both orders occur
    for pair in shown:  # the page's left/right are the stored responses in the recorded order
        index = pair.prompt.split()[-1]
        assert {pair.left, pair.right} == {f"a{index}", f"b{index}"}


def test_a_client_keeps_its_pair_and_another_client_gets_the_next(store):
    first = store.next_pair(A)
    assert store.next_pair(A) == first  # a reload shows the same pair
    second = store.next_pair(B)
    assert second.id != first.id
    store.add_label(first.id, A, "left", "ann")
    third = store.next_pair(A)
    assert third.id not in (first.id, second.id)


def test_labels_are_stored_exactly_with_chosen_and_rejected(store):
    choices = ["left", "right", "tie", "both_unacceptable", "right"]
    shown = []
    for choice in choices:
        pair = store.next_pair(A)
        shown.append(pair)
        store.add_label(pair.id, A, choice, "ann", note=f"note {choice}")
    assert store.next_pair(A) is None
    assert store.progress() == {"labelled": 5, "total": 5}
    judgements = store.judgements()
    assert [j["choice"] for j in judgements] == choices
    assert [j["note"] for j in judgements] == [f"note {c}" for c in choices]
    assert {j["labeller"] for j in judgements} == {"ann"}
    for pair, judgement in zip(shown, judgements):
        assert judgement["id"] == pair.id and judgement["source_a"] == {"model": "m", "draw": 1}
        if judgement["choice"] == "left":
            assert (judgement["chosen"], judgement["rejected"]) == (pair.left, pair.right)
        elif judgement["choice"] == "right":
            assert (judgement["chosen"], judgement["rejected"]) == (pair.right, pair.left)
        else:
            assert judgement["chosen"] is None and judgement["rejected"] is None
    rows, skipped = preference_pairs(judgements)
    assert skipped == {"tie": 1, "both_unacceptable": 1}
    assert rows == [{"prompt": j["prompt"], "chosen": j["chosen"], "rejected": j["rejected"]}
                    for j in judgements if j["chosen"] is not None]


def test_undo_takes_back_the_latest_label_and_serves_its_pair_again(store):
    first = store.next_pair(A)
    store.add_label(first.id, A, "left", "ann")
    second = store.next_pair(A)
    store.add_label(second.id, A, "tie", "ann")
    assert store.undo_last(A) == second.id
    assert store.progress()["labelled"] == 1
    assert store.next_pair(A) == second
    store.add_label(second.id, A, "right", "ann")
    assert [(j["id"], j["choice"]) for j in store.judgements()] == [(first.id, "left"), (second.id, "right")]
    with pytest.raises(LabelRefused, match="no label to undo") as refused:
        store.undo_last(B)
    assert refused.value.status == 409


def test_refused_labels_write_nothing(store):
    mine = store.next_pair(A)
    theirs = store.next_pair(B)
    cases = [((999, A, "left"), 404, "no pair 999"),
             ((mine.id, A, "better"), 422, "not one of"),
             ((theirs.id, A, "left"), 409, "not held by this page")]
    for args, status, message in cases:
        with pytest.raises(LabelRefused, match=message) as refused:
            store.add_label(*args, labeller="ann")
        assert refused.value.status == status
    assert store.progress()["labelled"] == 0
    store.add_label(mine.id, A, "left", "ann")
    with pytest.raises(LabelRefused, match="already labelled") as replay:
        store.add_label(mine.id, A, "left", "ann")  # a replayed request
    assert replay.value.status == 409
    assert len(store.judgements()) == 1


def test_an_expired_lease_lets_another_client_take_the_pair(store_url):
    labels = LabelStore(store_url, create=True, lease_seconds=-1.0)  # every lease already over
    labels.add_pairs(pair_rows(1))
    held = labels.next_pair(A)
    assert labels.next_pair(B) == held
    with pytest.raises(LabelRefused, match="not held by this page"):
        labels.add_label(held.id, A, "left", "ann")


def test_two_clients_at_once_never_hold_the_same_pair_and_lose_no_label(store_url):
    url = store_url
    LabelStore(url, create=True).add_pairs(pair_rows(60))
    judged: dict[str, list[int]] = {A: [], B: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def labeller(client: str) -> None:
        labels = LabelStore(url)  # its own engine and connections, as a second server process would have
        start.wait()
        try:
            while (pair := labels.next_pair(client)) is not None:
                time.sleep(0.005)  # reading the pair (SQLite's busy handler backs off, so a client that never pauses starves the other)
                labels.add_label(pair.id, client, "left", client)
                judged[client].append(pair.id)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)
        labels.close()

    threads = [threading.Thread(target=labeller, args=(client,)) for client in (A, B)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(judged[A]) > 5 and len(judged[B]) > 5  # both really labelled
    assert not set(judged[A]) & set(judged[B])
    stored = {j["id"]: j["client"] for j in LabelStore(url).judgements()}
    assert sorted(stored) == list(range(1, 61))
    assert stored == {**{i: A for i in judged[A]}, **{i: B for i in judged[B]}}


@pytest.mark.parametrize("url, message", [
    ("labels.db", "is not a database URL - pass sqlite:///labels.db"),
    ("sqlite:///{tmp}/missing.db", "no label store at"),
    ("nosuchdb://x/y", "no driver for nosuchdb|not a database URL"),
])
def test_bad_store_urls_are_one_line(tmp_path, url, message):
    with pytest.raises(LabelStoreError, match=message):
        LabelStore(url.format(tmp=tmp_path))


def test_a_file_that_is_not_a_label_store_is_refused_and_kept(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER)")
    with pytest.raises(LabelStoreError, match=r"other tables \(runs\), not a label store"):
        LabelStore(f"sqlite:///{other}", create=True)
    with sqlite3.connect(other) as conn:
        assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["runs"]
    text = tmp_path / "notes.db"
    text.write_text("not a database\n" * 100)
    with pytest.raises(LabelStoreError, match="cannot be opened"):
        LabelStore(f"sqlite:///{text}")
    assert text.read_text() == "not a database\n" * 100


def test_an_unreachable_server_database_is_one_line():
    from tests.label_helpers import free_port

    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/labels"  # nothing listens there
    with pytest.raises(LabelStoreError, match="cannot be reached .* - check that the database server runs"):
        LabelStore(url)


def test_two_commands_starting_on_one_new_file_make_the_store_once(tmp_path):
    url = f"sqlite:///{tmp_path}/new.db"
    start, errors = threading.Barrier(4), []

    def open_store() -> None:
        start.wait()
        try:
            LabelStore(url, create=True).close()
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    with sqlite3.connect(tmp_path / "new.db") as conn:
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("schema", "flan-rlhf-labels 1")]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # kept in the file by its maker
