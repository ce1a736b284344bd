"""The demo tokenizer (trained on the corpus, reloaded offline) and the cached demo assets."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from flan_rlhf.demo.corpus import read_jsonl, write_corpus
from flan_rlhf.demo.prepare import prepare_demo_assets
from flan_rlhf.demo.tokenizer import corpus_texts, train_corpus_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0, n_train=600, n_val=50, n_test=100)


@pytest.fixture(scope="module")
def saved_tokenizer_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_corpus_tokenizer([corpus["train"]], out, extra_texts=["Summarize the following conversation.\n\n\n\nSummary:"])


def test_reloads_offline_with_t5_special_ids(saved_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.padding_side == "right"
    ids = tokenizer("Anna books a table.").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1  # </s> appended once, as T5 does


def test_round_trip_of_unseen_test_summaries_and_dialogues(saved_tokenizer_dir, corpus):
    tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
    for row in read_jsonl(corpus["test"]):  # not in the tokenizer's training text
        summary_ids = tokenizer(row["summary"]).input_ids
        assert tokenizer.decode(summary_ids, skip_special_tokens=True) == row["summary"]
        assert 2 not in summary_ids  # no <unk>
        # Whitespace normalisation: the newlines between turns come back as single spaces.
        dialogue_ids = tokenizer(row["dialogue"]).input_ids
        assert tokenizer.decode(dialogue_ids, skip_special_tokens=True) == " ".join(row["dialogue"].split())


def test_words_and_punctuation_are_whole_tokens(saved_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("#Person1# buys a stupid lamp on Monday.").input_ids)
    assert tokens == ["\u2581#Person1#", "\u2581buys", "\u2581a", "\u2581stupid", "\u2581lamp", "\u2581on", "\u2581Monday", ".", "</s>"]
    template_tokens = tokenizer.convert_ids_to_tokens(tokenizer("Summarize the following conversation.").input_ids)
    assert template_tokens == ["\u2581Summarize", "\u2581the", "\u2581following", "\u2581conversation", ".", "</s>"]


def test_unseen_characters_and_padding(saved_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
    ids = tokenizer("Zq \u00fc").input_ids  # ASCII letters always encode (base alphabet); u-umlaut is <unk>
    assert 2 not in ids[:-2] and ids[-2] == 2
    batch = tokenizer(["a", "Anna books a table."], padding=True)
    assert batch["input_ids"][0][2:] == [0] * (len(batch["input_ids"][1]) - 2)
    assert batch["attention_mask"][0] == [1, 1] + [0] * (len(batch["input_ids"][1]) - 2)


def test_training_is_deterministic_and_vocab_is_capped(corpus, tmp_path):
    texts = corpus_texts([corpus["train"]])
    first, second = train_tokenizer(texts, vocab_size=4000), train_tokenizer(texts, vocab_size=4000)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    small = train_tokenizer(texts, vocab_size=300)
    assert len(small) == 300 < len(first) <= 4000


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=50"):
        train_tokenizer(["a b c"], vocab_size=50)
    with pytest.raises(FileNotFoundError, match="write_corpus"):
        corpus_texts([tmp_path / "missing.jsonl"])


def test_prepare_reuses_cache_and_rebuilds_when_settings_change(tmp_path):
    small = dict(n_train=120, n_val=20, n_test=20)
    paths = prepare_demo_assets(tmp_path, seed=0, **small)
    assert set(paths) == {"corpus_dir", "train", "validation", "test", "tokenizer"}
    assert AutoTokenizer.from_pretrained(paths["tokenizer"]).eos_token_id == 1
    stamps = {name: paths[name].stat().st_mtime_ns for name in ("train", "test")}
    tokenizer_stamp = (paths["tokenizer"] / "tokenizer.json").stat().st_mtime_ns

    again = prepare_demo_assets(tmp_path, seed=0, **small)  # cached: nothing rewritten
    assert {name: again[name].stat().st_mtime_ns for name in stamps} == stamps
    assert (again["tokenizer"] / "tokenizer.json").stat().st_mtime_ns == tokenizer_stamp

    original = paths["train"].read_bytes()
    first_row_only = original.split(b"\n")[0] + b"\n"
    paths["train"].write_bytes(first_row_only)  # same manifest, so the cached file is trusted as is
    assert prepare_demo_assets(tmp_path, seed=0, **small)["train"].read_bytes() == first_row_only
    assert prepare_demo_assets(tmp_path, seed=0, rebuild=True, **small)["train"].read_bytes() == original

    reseeded = prepare_demo_assets(tmp_path, seed=1, **small)  # new seed: new corpus, tokenizer retrained
    assert reseeded["train"].read_bytes() != original
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["seed"] == 1
    tokenizer_manifest = json.loads((tmp_path / "tokenizer" / "manifest.json").read_text())
    assert tokenizer_manifest["vocab_size"] == 4000 and len(tokenizer_manifest["corpus_sha256"]) == 64


def test_prepare_records_the_task_and_never_reuses_the_other_tasks_corpus(tmp_path, monkeypatch):
    from flan_rlhf.demo import corpus

    small = dict(n_train=120, n_val=20, n_test=20)
    manifest = tmp_path / "corpus" / "manifest.json"
    tail = prepare_demo_assets(tmp_path, seed=0, **small)
    assert json.loads(manifest.read_text())["task"] == "tail"
    tail_files = {split: tail[split].read_bytes() for split in ("train", "test")}
    tail_tokenizer = json.loads((tmp_path / "tokenizer" / "manifest.json").read_text())

    woven = prepare_demo_assets(tmp_path, seed=0, task="woven", **small)  # same root: rewritten, not reused
    assert json.loads(manifest.read_text())["task"] == "woven"
    assert json.loads(manifest.read_text())["generator"] == corpus.generator_fingerprint("woven")
    woven_train = woven["train"].read_bytes()
    assert woven_train != tail_files["train"] and woven["test"].read_bytes() == tail_files["test"]
    assert json.loads((tmp_path / "tokenizer" / "manifest.json").read_text()) != tail_tokenizer  # retrained

    # a woven corpus written by an older generator (other woven phrases) is rebuilt, not reused
    monkeypatch.setattr(corpus, "WOVEN_ADJECTIVES", ("stupid",))
    assert prepare_demo_assets(tmp_path, seed=0, task="woven", **small)["train"].read_bytes() != woven_train
    monkeypatch.undo()
    assert prepare_demo_assets(tmp_path, seed=0, task="woven", **small)["train"].read_bytes() == woven_train
    back = prepare_demo_assets(tmp_path, seed=0, **small)  # and back to the tail task: its very files
    assert {split: back[split].read_bytes() for split in ("train", "test")} == tail_files
    assert json.loads((tmp_path / "tokenizer" / "manifest.json").read_text()) == tail_tokenizer
