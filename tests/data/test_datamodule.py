"""PromptDataModule: splits, references, filters with counts, batch format, resume (data/datamodule.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import ByT5Tokenizer

from flan_rlhf.data import DataConfigError, PromptDataModule
from flan_rlhf.data.stream import PromptBatchStream


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def dialogsum_like(tmp_path):
    """train: `summary`; test: `summary1..3` (as in the DialogSum release)."""
    train = [{"dialogue": f"dialogue number {i}", "summary": f"summary {i}"} for i in range(6)]
    test = [{"dialogue": f"test dialogue {i}", "summary1": f"a{i}", "summary2": f"b{i}", "summary3": f"c{i}"}
            for i in range(4)]
    return {"train": write_jsonl(tmp_path / "train.jsonl", train),
            "test": write_jsonl(tmp_path / "test.jsonl", test)}


def test_batch_format_and_multi_reference_test_split(dialogsum_like, tmp_path):
    dm = PromptDataModule(dataset="json", data_files=dialogsum_like, val_split=None,
                          template="summarize_dialogue",
                          reference_columns=["summary", "summary1", "summary2", "summary3"], batch_size=4,
                          eval_batch_size=3, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.reports["train"].reference_columns == ["summary"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt", "references", "prompt_id", "sample", "truncated"}
    assert batch["prompt_id"].dtype == torch.long and batch["prompt_id"].shape == (4,)
    assert batch["sample"].tolist() == [0, 0, 0, 0]
    rows = zip(batch["prompt"], batch["references"], batch["prompt_id"].tolist())
    for prompt, references, prompt_id in rows:
        assert prompt == f"Summarize the following conversation.\n\ndialogue number {prompt_id}\n\nSummary:"
        assert references == [f"summary {prompt_id}"]
    dm.setup("test")
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["prompt_id"].tolist() == [0, 1, 2]
    assert test_batch["references"] == [["a0", "b0", "c0"], ["a1", "b1", "c1"], ["a2", "b2", "c2"]]
    assert dm.val_dataloader() == []  # val_split=None disables validation


def test_samples_per_prompt_and_max_eval_prompts():
    dm = PromptDataModule(builtin="tiny", samples_per_prompt=3, max_eval_prompts=2, eval_batch_size=4)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [len(b["prompt"]) for b in batches] == [4, 2]
    assert torch.cat([b["prompt_id"] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.cat([b["sample"] for b in batches]).tolist() == [0, 1, 2, 0, 1, 2]
    assert dm.reports["validation"].beyond_max_eval_prompts == 6  # 8 validation prompts, 2 kept


def test_char_filters_and_empty_prompts_are_counted_and_printed(tmp_path, capsys):
    rows = [{"text": t, "ref": "r"} for t in
            ["abcd", "abcde", "abcdefghij", "abcdefghijk", None, "", "   ", 42, "abcdefg"]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = PromptDataModule(dataset=path, val_split=None, prompt_column="text", reference_columns=["ref"],
                          min_chars=5, max_chars=10, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.loaded, report.invalid_prompts_dropped, report.shorter_than_min_chars,
            report.longer_than_max_chars, report.kept) == (9, 4, 1, 1, 3)
    assert dm.tables["train"].prompts == ["abcde", "abcdefghij", "abcdefg"]
    assert dm.tables["train"].prompt_ids == [1, 2, 8]  # row numbers in the file
    assert capsys.readouterr().out.splitlines() == [
        "data[train <- 'train']: 9 loaded; 4 null/empty/non-string prompts dropped; 1 shorter than min_chars=5 "
        "dropped; 1 longer than max_chars=10 dropped; 3 kept; references from: ref"]


def test_character_filters_leave_evaluation_splits_whole_unless_asked(tmp_path):
    """DialogSum's 200-1000 character recipe filter, applied to test too, silently dropped 116 of its 500
    dialogues (issue 24, point 2): filters apply to the training split unless filter_splits says more."""
    rows = {split: [{"text": t, "ref": "r"} for t in ["abcd", "abcdefg", "abcdefghijkl"]]
            for split in ("train", "validation", "test")}
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", split_rows) for split, split_rows in rows.items()}

    def kept(**options) -> dict[str, list[str]]:
        dm = PromptDataModule(dataset="json", data_files=files, prompt_column="text", reference_columns=["ref"],
                              min_chars=5, max_chars=10, cache_dir=str(tmp_path / "cache"), **options)
        dm.setup("fit")
        dm.setup("test")
        return {role: dm.tables[role].prompts for role in ("train", "validation", "test")}

    assert kept() == {"train": ["abcdefg"], "validation": ["abcd", "abcdefg", "abcdefghijkl"],
                      "test": ["abcd", "abcdefg", "abcdefghijkl"]}
    assert kept(filter_splits=["train", "test"]) == {"train": ["abcdefg"], "validation": ["abcd", "abcdefg", "abcdefghijkl"],
                                                     "test": ["abcdefg"]}
    with pytest.raises(DataConfigError, match=r"filter_splits names \['tset'\]; choose from"):
        PromptDataModule(builtin="tiny", filter_splits=["tset"])


@pytest.fixture
def byt5_dir(tmp_path):
    ByT5Tokenizer().save_pretrained(str(tmp_path / "byt5"))
    return str(tmp_path / "byt5")


def test_token_limit_truncates_with_a_count(tmp_path, byt5_dir, capsys):
    texts = ["a" * 5, "b" * 9, "c" * 10, "d" * 30]  # ByT5: len + 1 tokens with </s>
    path = write_jsonl(tmp_path / "p.jsonl", [{"dialogue": t} for t in texts])
    dm = PromptDataModule(dataset=path, val_split=None, reference_columns=[], max_prompt_tokens=10,
                          tokenizer=byt5_dir, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.tables["train"].prompts == ["aaaaa", "b" * 9, "c" * 9, "d" * 9]
    assert dm.reports["train"].truncated == 2
    assert dm.tables["train"].references == [[], [], [], []]
    assert "2 truncated to max_prompt_tokens=10 (end of the text cut, template kept)" in capsys.readouterr().out
    assert dm.tables["train"].truncated == [False, False, True, True]

    dropping = PromptDataModule(dataset=path, val_split=None, reference_columns=[], max_prompt_tokens=10,
                                tokenizer=byt5_dir, too_long="drop", cache_dir=str(tmp_path / "cache"))
    dropping.setup("fit")
    assert dropping.tables["train"].prompts == ["aaaaa", "b" * 9]
    assert dropping.reports["train"].too_many_tokens_dropped == 2


def test_fractional_split_gives_disjoint_parts(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [{"dialogue": f"d{i}", "summary": f"s{i}"} for i in range(10)])
    dm = PromptDataModule(dataset=path, split_fractions=[0.6, 0.2, 0.2], seed=1,
                          cache_dir=str(tmp_path / "cache"))
    dm.setup()
    ids = {role: dm.tables[role].prompt_ids for role in ("train", "validation", "test")}
    assert [len(ids[r]) for r in ("train", "validation", "test")] == [6, 2, 2]
    assert sorted(ids["train"] + ids["validation"] + ids["test"]) == list(range(10))
    # prompt_id is the row in the source file, so the text matches it
    assert all(dm.tables["test"].prompts[j] == f"d{i}" for j, i in enumerate(ids["test"]))


def test_nested_prompt_column(tmp_path):
    rows = [{"prompt": {"text": "So I told him", "toxicity": 0.1}},
            {"prompt": {"text": "Then she", "toxicity": 0.9}}]
    path = write_jsonl(tmp_path / "rtp.jsonl", rows)
    dm = PromptDataModule(dataset=path, val_split=None, prompt_column="prompt.text", reference_columns=[],
                          template="continue_text", cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.tables["train"].prompts == ["Continue the following text:\n\nSo I told him",
                                          "Continue the following text:\n\nThen she"]


def test_train_dataloader_starts_at_global_step_on_this_rank():
    dm = PromptDataModule(builtin="tiny", batch_size=5, seed=3)
    dm.trainer = SimpleNamespace(global_step=6, global_rank=1, world_size=2)
    batches = [next(iter(dm.train_dataloader()))]
    expected_rows = PromptBatchStream(48, 5, seed=3, start_batch=6, rank=1, world_size=2).rows_of_batch(6)
    table = dm.tables["train"]
    assert batches[0]["prompt_id"].tolist() == [table.prompt_ids[r] for r in expected_rows]


def test_resume_with_changed_training_data_is_refused():
    dm = PromptDataModule(builtin="tiny", batch_size=4)
    dm.setup("fit")
    state = dm.state_dict()
    assert state["train_rows"] == 48 and state["batch_size"] == 4
    changed = PromptDataModule(builtin="tiny", batch_size=4, min_chars=150)
    changed.load_state_dict(state)
    expected = r"differ from the checkpoint's \(train_rows: 48 then, \d+ now\)"
    with pytest.raises(DataConfigError, match=expected):
        changed.train_dataloader()
    same = PromptDataModule(builtin="tiny", batch_size=4)
    same.load_state_dict(state)
    assert len(next(iter(same.train_dataloader()))["prompt"]) == 4


def test_lightning_cli_style_parsing_of_the_constructor():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    config = parser.parse_args([
        "--data.dataset", "json", "--data.data_files", "{train: tr.jsonl, test: [a.jsonl, b.jsonl]}",
        "--data.reference_columns", "[summary, summary1]", "--data.too_long", "drop",
        "--data.val_split", "null",
    ])
    assert config.data.data_files == {"train": "tr.jsonl", "test": ["a.jsonl", "b.jsonl"]}
    assert list(config.data.reference_columns) == ["summary", "summary1"]
    assert config.data.val_split is None
    assert "evaluation samples per prompt" in parser.format_help()  # docstrings are the CLI help
    with pytest.raises(SystemExit):  # Literal choices are enforced by the parser
        parser.parse_args(["--data.dataset", "json", "--data.too_long", "cut"])


def test_tiny_fit_resumes_the_exact_data_order(tmp_path):
    """A real Trainer: batches after resuming from a step-2 checkpoint equal the uninterrupted run's."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["prompt_id"].tolist())
            return (self.weight - 1.0).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_path=None, callbacks=()):
        module = Recorder()
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                             limit_val_batches=0, default_root_dir=str(tmp_path))
        data = PromptDataModule(builtin="tiny", batch_size=20, seed=11)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module.seen

    uninterrupted = fit(5)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2,
                                              save_top_k=-1)
    fit(2, callbacks=[checkpoint])
    resumed = fit(5, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert resumed == uninterrupted[2:]
    assert len(uninterrupted) == 5 and uninterrupted[2] != uninterrupted[0]
