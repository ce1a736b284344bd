"""export --push_to_hub: what would be uploaded (dry run), the upload calls (the Hub stubbed), and one line
naming the repo when there is no token or no network; the export stays written either way."""
from __future__ import annotations

import huggingface_hub
import pytest

from flan_rlhf.tools.hub_push import HubPushError, push_folder, upload_listing


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / "merged"
    (folder / "base").mkdir(parents=True)
    (folder / "README.md").write_text("card")
    (folder / "model.safetensors").write_bytes(b"\0" * (3 * 2**20))
    (folder / "base" / "config.json").write_text("{}")
    return folder


def test_the_dry_run_lists_every_file_and_sends_nothing(export_folder, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded in a dry run"))
    assert upload_listing(str(export_folder)) == ["    README.md (4 bytes)", "    base/config.json (2 bytes)",
                                                  "    model.safetensors (3.00 MB)"]
    lines = push_folder(str(export_folder), "me/tiny", dry_run=True).splitlines()
    assert lines[0] == "  push_to_hub (dry run): 3 files to me/tiny" and len(lines) == 4


def test_the_upload_creates_a_private_repo_and_sends_the_folder(export_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))

    class Commit:
        commit_url = "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)) or Commit())
    assert push_folder(str(export_folder), "me/tiny") == "  pushed: https://huggingface.co/me/tiny/commit/abc"
    assert calls[0] == ("create", "me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "me/tiny" and calls[1][1]["folder_path"] == str(export_folder)


def test_no_token_or_no_network_is_one_line_naming_the_repo(export_folder, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match=r"--push_to_hub me/tiny: no Hugging Face token - run `hf auth login`"):
        push_folder(str(export_folder), "me/tiny")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def offline(self, *args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(HubPushError) as caught:
        push_folder(str(export_folder), "me/tiny")
    assert "--push_to_hub me/tiny: HF_HUB_OFFLINE is set" in str(caught.value) and "\n" not in str(caught.value)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(HubPushError, match="cannot reach the Hub"):
        push_folder(str(export_folder), "me/tiny")
    assert (export_folder / "model.safetensors").is_file()


def test_export_push_to_hub_dry_run_and_offline_through_the_command(tmp_path, monkeypatch):
    from tests.conftest import run_command
    from tests.test_cli import tiny_config

    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    assert run_command("fit", "--config", config, "--trainer.max_steps", "1")[0] == 0
    code, out, err = run_command("export", "--ckpt_path", "last", "--run_config", config, "--out", "merged",
                                 "--push_to_hub", "me/tiny", "--dry_run", "true")
    assert code == 0, err[-2000:]
    assert "  push_to_hub (dry run): 7 files to me/tiny" in out and "    model.safetensors (" in out
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as `make test` sets it: no network here
    code, out, err = run_command("export", "--ckpt_path", "last", "--run_config", config, "--out", "merged2",
                                 "--push_to_hub", "me/tiny")
    assert code == 2 and err.strip() == ("error: --push_to_hub me/tiny: HF_HUB_OFFLINE is set, so nothing can be "
                                         "uploaded - unset it on a connected machine; the export is written in merged2")
    assert out.splitlines()[-1].startswith("  folder: merged2 (") and (tmp_path / "merged2" / "README.md").is_file()
