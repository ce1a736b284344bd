"""The demo corpus: format, determinism, split hygiene, and toxicity as the offline scorer sees it."""
from __future__ import annotations

import re
import string

import pytest

from flan_rlhf.demo.corpus import (
    HOSTILE_TAILS,
    INSULT_VOCABULARY,
    SLOTS,
    TAIL_TARGETS,
    TEMPLATES,
    TOPICS,
    generate_split,
    read_jsonl,
    write_corpus,
)

TURN = re.compile(r"^#Person[12]#: \S.*$")
ALL_TAILS = {tail.format(target=target) for tail in HOSTILE_TAILS for target in TAIL_TARGETS}


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    """The demo's default corpus (4000 / 400 / 400), written once for the module (~0.4 s)."""
    paths = write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)
    return {split: read_jsonl(path) for split, path in paths.items()}


def test_rows_have_dialogsum_format(default_corpus):
    for split, rows in default_corpus.items():
        assert [row["id"] for row in rows] == [f"{split}_{i}" for i in range(len(rows))]
        for row in rows:
            assert set(row) == {"id", "dialogue", "summary", "clean_summary", "topic", "toxic"}
            turns = row["dialogue"].split("\n")
            assert 2 <= len(turns) <= 6
            assert all(TURN.match(turn) for turn in turns), row["dialogue"]
            assert len(row["dialogue"]) < 400
            assert row["topic"] in TOPICS
            # One sentence: a single full stop, at the end (no abbreviations in the templates).
            assert row["clean_summary"].endswith(".") and row["clean_summary"].count(".") == 1


def test_split_sizes_and_toxic_shares(default_corpus):
    assert [len(default_corpus[s]) for s in ("train", "validation", "test")] == [4000, 400, 400]
    assert sum(row["toxic"] for row in default_corpus["train"]) == round(4000 * 0.33) == 1320
    assert not any(row["toxic"] for row in default_corpus["test"])
    assert not any(row["toxic"] for row in default_corpus["validation"])


def test_toxic_summary_is_clean_summary_plus_one_hostile_tail(default_corpus):
    for row in default_corpus["train"]:
        if row["toxic"]:
            head, _, tail = row["summary"].partition(". ")
            assert head + "." == row["clean_summary"]
            assert tail in ALL_TAILS
        else:
            assert row["summary"] == row["clean_summary"]


def test_no_dialogue_is_shared_between_splits(default_corpus):
    seen: set[str] = set()
    for rows in default_corpus.values():
        dialogues = {row["dialogue"] for row in rows}
        assert len(dialogues) == len(rows)
        assert not dialogues & seen
        seen |= dialogues


def test_every_topic_is_well_represented(default_corpus):
    counts = {topic: 0 for topic in TOPICS}
    for row in default_corpus["train"]:
        counts[row["topic"]] += 1
    # 14 topics drawn uniformly: expected 286 each; 200 is > 5 standard deviations below.
    assert len(TOPICS) == 14 and min(counts.values()) >= 200


def test_summary_slots_all_come_from_the_dialogue():
    """Derivability: every slot a summary template uses also appears in its dialogue."""
    for template in TEMPLATES:
        dialogue_slots = {f for line in template.turns for _, f, _, _ in string.Formatter().parse(line[1]) if f}
        summary_slots = {f for _, f, _, _ in string.Formatter().parse(template.summary) if f}
        assert summary_slots <= dialogue_slots, template.summary
        assert (dialogue_slots | summary_slots) <= set(SLOTS)


def test_same_arguments_give_byte_identical_files(tmp_path):
    first = write_corpus(tmp_path / "a", seed=3, n_train=200, n_val=20, n_test=20)
    second = write_corpus(tmp_path / "b", seed=3, n_train=200, n_val=20, n_test=20)
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes()
    other_seed = write_corpus(tmp_path / "c", seed=4, n_train=200, n_val=20, n_test=20)
    assert other_seed["train"].read_bytes() != first["train"].read_bytes()
    assert not list(tmp_path.glob("*/*.tmp-*"))  # no temporary file of flan_rlhf.io.atomic_file is left


def test_test_split_does_not_depend_on_train_size(tmp_path):
    small = write_corpus(tmp_path / "small", seed=0, n_train=50, n_val=10, n_test=30)
    large = write_corpus(tmp_path / "large", seed=0, n_train=300, n_val=10, n_test=30)
    assert small["test"].read_bytes() == large["test"].read_bytes()


def test_heldout_toxic_share_applies_to_validation_only(tmp_path):
    paths = write_corpus(tmp_path, seed=0, n_train=100, n_val=100, n_test=100, heldout_toxic_share=0.5)
    assert sum(row["toxic"] for row in read_jsonl(paths["validation"])) == 50
    assert sum(row["toxic"] for row in read_jsonl(paths["test"])) == 0


def test_scorer_flags_toxic_summaries_and_passes_clean_ones(default_corpus):
    from profanity_check import predict_prob

    train = default_corpus["train"]
    toxic = predict_prob([row["summary"] for row in train if row["toxic"]])
    clean = predict_prob([row["summary"] for row in train if not row["toxic"]])
    held_out = predict_prob([row["summary"] for row in default_corpus["test"]])
    # Measured (seed 0): toxic share >= 0.5 is 1.000 (min 0.85); clean 0.000 (max 0.34).
    assert (toxic >= 0.5).mean() >= 0.9
    assert (clean >= 0.5).mean() < 0.05
    assert (held_out >= 0.5).mean() < 0.05


def test_insult_vocabulary_covers_every_flagged_tail_word():
    from profanity_check import predict_prob

    tail_words = sorted({w.lower() for tail in HOSTILE_TAILS for w in re.findall(r"[A-Za-z]+", tail)})
    flagged = {w for w, p in zip(tail_words, predict_prob(tail_words)) if p >= 0.5}
    assert flagged <= set(INSULT_VOCABULARY)
    assert {"stupid", "idiot", "moron", "crap", "shit"} <= flagged  # the scorer does react to them
    for word in INSULT_VOCABULARY:
        assert any(re.search(rf"\b{word}\b", tail, re.IGNORECASE) for tail in HOSTILE_TAILS), word
    for tail in HOSTILE_TAILS:  # three insult words each (two mild ones score < 0.5 after a long summary)
        words = re.findall(r"[a-z]+", tail.lower())
        assert sum(w in INSULT_VOCABULARY for w in words) >= 3, tail


def test_clean_text_holds_no_insult_fragment(default_corpus):
    """The insult_fraction metric matches fragments of >= 4 letters: clean text must not trip it."""
    fragments = {w[i:j] for w in INSULT_VOCABULARY for i in range(len(w)) for j in range(i + 4, len(w) + 1)}
    clean_text = " ".join(
        f"{row['dialogue']} {row['clean_summary']}".lower() for rows in default_corpus.values() for row in rows
    )
    assert "dumb" in fragments and "diot" in fragments
    assert [fragment for fragment in sorted(fragments) if fragment in clean_text] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n": -1}, "n must be >= 0"), ({"n": 5, "toxic_share": 1.5}, "toxic_share must be in")],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_split("train", **kwargs)
