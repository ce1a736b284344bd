"""Export and adapter folders follow the user's umask (tempfile and safetensors alone give 0700/0600)."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from flan_rlhf.io import atomic_folder, creation_modes


def modes(folder) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``folder`` and everything under it."""
    found = {".": stat.S_IMODE(os.stat(folder).st_mode)}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


@pytest.fixture
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_an_atomic_folder_follows_the_umask(umask, tmp_path):
    from safetensors.torch import save_file

    assert creation_modes(str(tmp_path)) == (0o666 & ~umask, 0o777 & ~umask)
    with atomic_folder(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, os.path.join(tmp, "model.safetensors"))  # safetensors writes 0600
        os.mkdir(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "notes.txt"), "w").close()
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    assert modes(tmp_path / "out") == {".": folders, "model.safetensors": files, "sub": folders, "sub/notes.txt": files}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no probe left behind


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_fit_export_and_export_command_follow_the_umask(umask, tmp_path, monkeypatch):
    from tests.conftest import run_command
    from tests.test_cli import tiny_config

    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    assert run_command("fit", "--config", config, "--trainer.max_steps", "1")[0] == 0
    assert run_command("export", "--ckpt_path", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"))[0] == 0
    for folder in (tmp_path / "adapter", tmp_path / "merged"):  # the adapter holds its base (built from t5_config) in base/
        found = modes(folder)
        folders = {name for name in found if os.path.isdir(folder / name)}
        assert {found[name] for name in folders} == {0o777 & ~umask}, folder
        assert {mode for name, mode in found.items() if name not in folders} == {0o666 & ~umask}, (
            folder, {name: oct(mode) for name, mode in found.items()})
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt" / "last.ckpt").st_mode) == 0o666 & ~umask
