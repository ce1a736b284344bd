"""``flan-rlhf export ... --push_to_hub REPO``: upload an export folder to the Hugging Face Hub.

The upload is ``huggingface_hub.HfApi.create_repo`` (``exist_ok``) then ``upload_folder``;
``--dry_run true`` lists what would be uploaded and touches no network. No token, no network or a
refusal by the Hub is one line naming the repo and the fix (the export folder stays written).
"""
from __future__ import annotations

import os


class HubPushError(ValueError):
    """The export could not be uploaded; the message names the repo and the fix."""


def upload_listing(folder: str) -> list[str]:
    """``"    path (size)"`` for each file ``upload_folder`` would send, sorted by path (sub-folders included)."""
    lines = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            lines.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return [f"    {relative} ({size / 2**20:.2f} MB)" if size >= 2**20 else f"    {relative} ({size} bytes)"
            for relative, size in sorted(lines)]


def push_folder(folder: str, repo_id: str, dry_run: bool = False, private: bool = True) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing, ``private`` by default).

    Returns:
        lines for the closing summary: the repo URL, or the dry-run listing.

    Raises:
        HubPushError: no token, offline, or the Hub refused (one line).
    """
    listing = upload_listing(folder)
    if dry_run:
        return "\n".join([f"  push_to_hub (dry run): {len(listing)} files to {repo_id}", *listing])
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if get_token() is None:
        raise HubPushError(f"--push_to_hub {repo_id}: no Hugging Face token - run `hf auth login` or set HF_TOKEN; "
                           f"the export is written in {folder}")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                   commit_message="Upload a flan-rlhf export")
    except OfflineModeIsEnabled:
        raise HubPushError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded - unset it on a "
                           f"connected machine; the export is written in {folder}") from None
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubPushError(f"--push_to_hub {repo_id}: the Hub refused ({first}) - check the repo name and that your token "
                           f"may write to it; the export is written in {folder}") from None
    except (ConnectionError, OSError) as err:
        raise HubPushError(f"--push_to_hub {repo_id}: cannot reach the Hub ({type(err).__name__}) - check the network; "
                           f"the export is written in {folder}") from None
    return f"  pushed: {getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo_id}'}"
