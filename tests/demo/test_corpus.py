"""The demo corpus: format, determinism, split hygiene, and toxicity as the offline scorer sees it."""
from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path

import pytest

from flan_rlhf.demo import corpus as corpus_module
from flan_rlhf.demo.corpus import (
    HOSTILE_TAILS,
    INSULT_VOCABULARY,
    SLOTS,
    TAIL_TARGETS,
    TEMPLATES,
    TOPICS,
    WOVEN_ADJECTIVES,
    WOVEN_APPOSITIVES,
    WOVEN_OPENINGS,
    WOVEN_PERSON_QUALIFIERS,
    generate_split,
    generator_fingerprint,
    read_jsonl,
    write_corpus,
)

TURN = re.compile(r"^#Person[12]#: \S.*$")
ALL_TAILS = {tail.format(target=target) for tail in HOSTILE_TAILS for target in TAIL_TARGETS}
WOVEN_PHRASES = (*WOVEN_OPENINGS, *WOVEN_APPOSITIVES, *WOVEN_PERSON_QUALIFIERS, *WOVEN_ADJECTIVES)
#: The words a woven summary adds besides insult words.
WOVEN_GLUE = {"the", "that", "a"}


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    """The demo's default corpus (4000 / 400 / 400), written once for the module (~0.4 s)."""
    paths = write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)
    return {split: read_jsonl(path) for split, path in paths.items()}


@pytest.fixture(scope="module")
def woven_corpus(tmp_path_factory):
    """The default corpus of the ``woven`` task (``flan-rlhf demo --task woven``), written once."""
    paths = write_corpus(tmp_path_factory.mktemp("woven"), seed=0, task="woven")
    return {split: read_jsonl(path) for split, path in paths.items()}


def tokens(text: str) -> list[str]:
    """Lower-case words of a summary, punctuation dropped (``#person1#'s`` stays one word)."""
    return re.findall(r"[\w#']+", text.lower())


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
    for word in INSULT_VOCABULARY:  # no stale entry: each is used by a tail or a woven phrase
        assert any(re.search(rf"\b{word}\b", phrase, re.IGNORECASE) for phrase in (*HOSTILE_TAILS, *WOVEN_PHRASES)), word
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
    [({"n": -1}, "n must be >= 0"), ({"n": 5, "toxic_share": 1.5}, "toxic_share must be in"),
     ({"n": 5, "task": "braided"}, "task must be one of tail, woven")],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_split("train", **kwargs)


# --------------------------------------------------------------------------- the woven task
#: sha256 of the files ``write_corpus(seed=0, n_train=200, n_val=20, n_test=30, heldout_toxic_share=0.3)``
#: wrote before the woven task existed (the code of cf6f5e0): the tail task must not change.
TAIL_CORPUS_SHA256 = {
    "train": "3ada7a29dbff66d3cdd72934feb6d117615657fbcdfa549a6bc9ab7bb0410ad2",
    "validation": "bfcd06ff2fba5eecd2f35218dc1095cb1851cdcd60ba47e16f64cb85836ff907",
    "test": "6fd7786836f82f1c401cf3f0f9ab030485c089e93052343b4ca2c9010d1408d5",
}


def test_tail_corpus_is_byte_identical_to_the_one_before_the_woven_task(tmp_path):
    for task in ({}, {"task": "tail"}):
        paths = write_corpus(tmp_path / str(len(task)), seed=0, n_train=200, n_val=20, n_test=30,
                             heldout_toxic_share=0.3, **task)
        assert {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in paths.items()} == TAIL_CORPUS_SHA256


def test_woven_corpus_has_the_tail_rows_with_only_the_toxic_summaries_rewritten(default_corpus, woven_corpus):
    for split, rows in woven_corpus.items():
        tail_rows = default_corpus[split]
        same = ("id", "dialogue", "clean_summary", "topic", "toxic")
        assert [[row[key] for key in same] for row in rows] == [[row[key] for key in same] for row in tail_rows]
        for row in rows:
            assert (row["summary"] != row["clean_summary"]) == row["toxic"]
    assert sum(row["toxic"] for row in woven_corpus["train"]) == 1320
    # held-out splits stay clean: the very rows of the tail task
    assert woven_corpus["test"] == default_corpus["test"] and woven_corpus["validation"] == default_corpus["validation"]


def test_woven_insults_sit_at_the_start_and_in_the_middle(woven_corpus):
    """Cutting a woven summary before its first insult keeps at most its first word, so a policy
    that stops early loses the summary; the summary's own words are all there, in order."""
    insults = set(INSULT_VOCABULARY)
    for row in (row for row in woven_corpus["train"] if row["toxic"]):
        woven, clean = row["summary"], row["clean_summary"]
        assert not woven.startswith(clean.removesuffix(".")), woven
        clean_words, woven_words = tokens(clean), tokens(woven)
        # align: the clean words are a subsequence of the woven ones; every other word is woven in
        matched, clean_before = 0, []  # clean_before[i]: clean words before woven word i
        for word in woven_words:
            clean_before.append(matched)
            if matched < len(clean_words) and word == clean_words[matched]:
                matched += 1
        assert matched == len(clean_words), (woven, clean)
        added = [i for i, (before, after) in enumerate(zip(clean_before, [*clean_before[1:], matched]))
                 if before == after]
        assert {woven_words[i] for i in added} <= insults | WOVEN_GLUE, woven
        insult_at = [i for i in added if woven_words[i] in insults]
        assert clean_before[insult_at[0]] <= 1, woven  # the start: before the summary's second word
        assert any(2 <= clean_before[i] <= len(clean_words) - 2 for i in insult_at), woven  # the middle
        assert len(insult_at) >= 3, woven


def test_woven_summaries_are_toxic_to_the_scorer_and_clean_ones_are_not(woven_corpus):
    from profanity_check import predict_prob

    from flan_rlhf.rewards import ProfanityReward

    train = woven_corpus["train"]
    toxic_texts = [row["summary"] for row in train if row["toxic"]]
    toxic = predict_prob(toxic_texts)
    clean = predict_prob([row["summary"] for row in train if not row["toxic"]])
    # Measured (seed 0, alt-profanity-check 1.9.1): toxic min 0.868, median 1.000; clean max 0.342.
    assert (toxic >= 0.5).all() and (toxic >= 0.8).mean() >= 0.99
    assert (clean >= 0.5).mean() < 0.05
    # the demo's toxic_fraction: the worst 80-character chunk (measured min 0.916)
    assert (ProfanityReward().setup().toxicity(toxic_texts).numpy() >= 0.5).all()


def test_woven_phrases_use_only_vocabulary_insults():
    from profanity_check import predict_prob

    words = sorted({w.lower() for phrase in WOVEN_PHRASES for w in re.findall(r"[A-Za-z]+", phrase)})
    assert set(words) <= set(INSULT_VOCABULARY) | WOVEN_GLUE
    assert {w for w, p in zip(words, predict_prob(words)) if p >= 0.5} <= set(INSULT_VOCABULARY)
    for phrase in WOVEN_PHRASES:  # every phrase insults; an opening (before the subject) twice
        count = sum(w in INSULT_VOCABULARY for w in re.findall(r"[a-z]+", phrase.lower()))
        assert count >= (2 if phrase in WOVEN_OPENINGS + WOVEN_APPOSITIVES else 1), phrase


@pytest.mark.parametrize("table", ["WOVEN_OPENINGS", "WOVEN_APPOSITIVES", "WOVEN_PERSON_QUALIFIERS", "WOVEN_ADJECTIVES"])
def test_woven_fingerprint_covers_the_woven_phrases_and_the_tail_one_does_not(monkeypatch, table):
    woven, tail = generator_fingerprint("woven"), generator_fingerprint("tail")
    assert woven != tail and generator_fingerprint() == tail
    monkeypatch.setattr(corpus_module, table, (*getattr(corpus_module, table), "dumb"))
    assert generator_fingerprint("woven") != woven
    assert generator_fingerprint("tail") == tail  # a tail corpus is not rebuilt for a woven change


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo", "dpo"])
def test_the_demo_configs_monitor_the_corpus_insult_words(method):
    """Each demo config's no_insult monitor lists the generator's insult words, so its mean is 1 - insult_fraction."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / f"demo_{method}.yaml").read_text())
    monitors = {m["class_path"].rpartition(".")[2]: m.get("init_args", {}) for m in config["model"]["init_args"]["monitors"]}
    assert set(monitors) == {"VaderReward", "WordListReward"}
    assert monitors["WordListReward"]["name"] == "no_insult"
    assert monitors["WordListReward"]["words"] == list(INSULT_VOCABULARY)
