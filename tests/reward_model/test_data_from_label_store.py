"""Training from a label store: ``PreferenceDataModule(store=...)`` gives DPO and the reward model the
labels that prefer one response (ties and 'both unacceptable' left out), through the real CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flan_rlhf.label_store import LabelStore, preference_pairs
from flan_rlhf.reward_model import PreferenceDataModule
from tests.conftest import CHECKOUT, error_lines, run_command

N_PAIRS = 48
TIES = {5, 17}
BOTH_UNACCEPTABLE = {11, 29}
N_PREFERRED = N_PAIRS - len(TIES) - len(BOTH_UNACCEPTABLE)
CLIENT = "clientAAAA"


def kind(i: int) -> str:
    return f"Thank you for asking about item {i}, I am happy to help."


def rude(i: int) -> str:
    return f"Go away, item {i} is not my problem."


def labelled_store(folder: Path) -> str:
    """A store of ``N_PAIRS`` pairs labelled through leases as a labeller would: the kind reply preferred on
    whichever side the page shows it, except the ``TIES`` and ``BOTH_UNACCEPTABLE`` pairs; its URL."""
    url = f"sqlite:///{folder}/labels.db"
    store = LabelStore(url, create=True)
    try:
        store.add_pairs([{"prompt": f"Reply to: item {i}", "response_a": kind(i), "response_b": rude(i),
                          "source_a": {}, "source_b": {"draw": 2}} for i in range(N_PAIRS)], seed=0)
        while (pair := store.next_pair(CLIENT)) is not None:
            i = int(pair.prompt.rsplit(" ", 1)[1])
            choice = ("tie" if i in TIES else "both_unacceptable" if i in BOTH_UNACCEPTABLE
                      else "left" if pair.left == kind(i) else "right")
            store.add_label(pair.id, CLIENT, choice, "ann")
        assert store.progress() == {"labelled": N_PAIRS, "total": N_PAIRS}
    finally:
        store.close()
    return url


@pytest.fixture
def store_url(tmp_path) -> str:
    return labelled_store(tmp_path)


def triples(data) -> set[tuple[str, str, str]]:
    return {(row["prompt"], row["chosen"], row["rejected"]) for row in data}


def test_the_data_module_gives_exactly_the_preferred_pairs_with_their_prompts(store_url, caplog):
    labels = LabelStore(store_url)
    rows, skipped = preference_pairs(labels.judgements())
    labels.close()
    assert skipped == {"tie": len(TIES), "both_unacceptable": len(BOTH_UNACCEPTABLE)}
    assert len(rows) == N_PREFERRED
    assert {row["chosen"] for row in rows} == {kind(i) for i in range(N_PAIRS) if i not in TIES | BOTH_UNACCEPTABLE}

    data = PreferenceDataModule(store=store_url, batch_size=8, seed=0)
    assert data.prompt_column == "prompt"  # DPO's check for a prompt passes without --data.prompt_column
    with caplog.at_level("INFO"):
        data.setup("fit")
    assert f"{N_PREFERRED} preference pairs (left out: 2 ties, 2 both unacceptable)" in caplog.text
    assert len(data.train_data) + len(data.val_data) == N_PREFERRED and len(data.val_data) >= 1
    assert triples(data.train_data) | triples(data.val_data) == triples(rows)
    assert not triples(data.train_data) & triples(data.val_data)

    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"prompt", "chosen", "rejected"} and len(batch["prompt"]) == 8
    for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
        i = int(prompt.rsplit(" ", 1)[1])
        assert (chosen, rejected) == (kind(i), rude(i)) and i not in TIES | BOTH_UNACCEPTABLE


def test_a_store_without_a_preference_or_with_foreign_columns_is_refused_in_one_line(tmp_path):
    from flan_rlhf.data import DataConfigError

    url = f"sqlite:///{tmp_path}/ties.db"
    store = LabelStore(url, create=True)
    store.add_pairs([{"prompt": "p", "response_a": "a", "response_b": "b", "source_a": {}, "source_b": {}}] * 2)
    for choice in ("tie", "both_unacceptable"):
        store.add_label(store.next_pair(CLIENT).id, CLIENT, choice, "ann")
    store.close()
    with pytest.raises(DataConfigError, match=r"no label that prefers one response \(1 ties, 1 both unacceptable\) "
                                              r"- label more pairs") as err:
        PreferenceDataModule(store=url).setup("fit")
    assert "\n" not in str(err.value)
    with pytest.raises(DataConfigError, match=r"drop prompt_column='question'"):
        PreferenceDataModule(store=url, prompt_column="question")


def shrunk_config(name: str, out: Path, **trainer_updates) -> Path:
    """``configs/<name>`` with every output under ``out`` and ``trainer_updates``, written to ``out``."""
    config = yaml.safe_load((CHECKOUT / "configs" / name).read_text())
    trainer = config["trainer"]
    trainer.update(trainer_updates, default_root_dir=str(out / "root"), enable_progress_bar=False,
                   enable_model_summary=False)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(out / "lightning_logs")
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / "ckpt")
    config["model"]["init_args"]["export_dir"] = str(out / "export")
    path = out / name
    path.write_text(yaml.safe_dump(config))
    return path


def fit_from_store(monkeypatch, config: Path, url: str, *args: str) -> tuple[int, str, PreferenceDataModule]:
    """``flan-rlhf fit --config config --data PreferenceDataModule --data.store url *args`` in process:
    ``(exit code, output, the data module the run trained from)``."""
    modules = []
    setup = PreferenceDataModule.setup

    def recording_setup(self, stage=None):
        modules.append(self)
        return setup(self, stage)

    monkeypatch.setattr(PreferenceDataModule, "setup", recording_setup)
    monkeypatch.chdir(config.parent)  # anything relative lands under tmp_path too
    code, out, err = run_command("fit", "--config", str(config), "--data", "flan_rlhf.reward_model.PreferenceDataModule",
                                 "--data.store", url, *args)
    return code, out + err, (modules[-1] if modules else None)


def assert_trained_on_the_store(data: PreferenceDataModule, url: str) -> None:
    assert data.store == url and data.train_data is not None
    assert len(data.train_data) == N_PREFERRED - len(data.val_data)
    assert {row["chosen"] for row in data.train_data} <= {kind(i) for i in range(N_PAIRS)}


def test_dpo_fits_from_a_label_store_through_the_cli(tmp_path, store_url, monkeypatch):
    from flan_rlhf.eval.report import read_scalar_curves

    config = shrunk_config("dpo_tiny.yaml", tmp_path, max_steps=4, val_check_interval=4, limit_val_batches=1)
    code, output, data = fit_from_store(monkeypatch, config, store_url, "--data.stream", "true",
                                        "--data.batch_size", "8")
    assert code == 0, output[-3000:]
    assert (tmp_path / "export" / "adapter_model.safetensors").is_file()
    assert_trained_on_the_store(data, store_url)
    (curves,) = read_scalar_curves(tmp_path / "lightning_logs").values()
    steps, _ = curves["rewards/accuracies"]
    assert len(steps) == 4  # one DPO step per batch of the store's pairs
    assert "val/rewards/accuracies" in curves


def test_the_reward_model_fits_from_a_label_store_through_the_cli(tmp_path, store_url, monkeypatch):
    config = shrunk_config("reward_model_tiny.yaml", tmp_path, max_epochs=1)
    code, output, data = fit_from_store(monkeypatch, config, store_url, "--data.batch_size", "8")
    assert code == 0, output[-3000:]
    assert (tmp_path / "export" / "config.json").is_file()
    assert (tmp_path / "export" / "flan_rlhf_reward.json").is_file()
    assert_trained_on_the_store(data, store_url)


def test_a_missing_store_is_one_error_line(tmp_path, monkeypatch):
    config = shrunk_config("dpo_tiny.yaml", tmp_path, max_steps=1)
    code, output, _ = fit_from_store(monkeypatch, config, f"sqlite:///{tmp_path}/missing.db", "--data.stream", "true")
    assert code == 2, output[-3000:]
    errors = error_lines(output)
    assert len(errors) == 1 and "no label store at" in errors[0] and "flan-rlhf label" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "missing.db").exists()  # reading never creates a store


def test_the_exported_pairs_file_gives_the_same_pairs_as_the_store(tmp_path, store_url):
    pairs = tmp_path / "pairs.jsonl"
    code, out, err = run_command("label", "--store", store_url, "--export", str(pairs))
    assert code == 0, out + err
    from_file = PreferenceDataModule(dataset=str(pairs), prompt_column="prompt", seed=3, val_fraction=0.1)
    from_store = PreferenceDataModule(store=store_url, seed=3, val_fraction=0.1)
    from_file.setup("fit")
    from_store.setup("fit")
    assert triples(from_file.train_data) == triples(from_store.train_data)
    assert triples(from_file.val_data) == triples(from_store.val_data)
    assert len(triples(from_store.train_data) | triples(from_store.val_data)) == N_PREFERRED
