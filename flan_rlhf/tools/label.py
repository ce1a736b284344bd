"""``flan-rlhf label``: sample pairs of responses, serve the labelling page, export the judgements.

::

    flan-rlhf label --data prompts.jsonl --model google/flan-t5-base --adapter artifacts/adapter
    flan-rlhf label --export pairs.jsonl          # the prompt/chosen/rejected file of the store
    flan-rlhf fit --config configs/dpo_tiny.yaml --data flan_rlhf.reward_model.PreferenceDataModule \
        --data.store sqlite:///labels.db          # train on the store directly

Sampling adds a pair for each prompt of ``--data`` the store has no pair for from the same two
sources (so a restart samples nothing and serves where it stopped); two responses per prompt from
``--model``/``--adapter``, or one from it and one from ``--model_b``/``--adapter_b``. A pair whose
two responses are the same text has its second drawn again (``--redraws``, 2), and is not stored if
they stay the same (nothing to choose between).
"""
from __future__ import annotations

import getpass
import os
import secrets
import socket
import sys
import time
from typing import Any

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from flan_rlhf.interrupts import set_activity
from flan_rlhf.label_store import LabelStore, LabelStoreError, preference_pairs, sqlite_path, without_preference
from flan_rlhf.progress import RowProgress, seconds
from flan_rlhf.settings import GenerationSettings, SettingsError, check_generation_settings
from flan_rlhf.tools.command import UsageError, run_tool
from flan_rlhf.tools.generate import decode, generate_ids, load_generation_model, read_prompts, write_jsonl

#: where ``--token`` is read from when not given (a command line is visible to other users in ``ps``)
TOKEN_VARIABLE = "FLAN_RLHF_LABEL_TOKEN"


def source_of(model: str, adapter: str | None, generation: GenerationSettings, seed: int, draw: int) -> dict[str, Any]:
    """What made a response, as stored with it: model, adapter, decoding, seed and which draw (1 or 2)."""
    return {"model": model, "adapter": adapter, "decoding": generation.mode, "max_new_tokens": generation.max_new_tokens,
            "temperature": generation.temperature, "top_k": generation.top_k, "top_p": generation.top_p,
            "seed": seed, "draw": draw}


def same_text(a: str, b: str) -> bool:
    """Two responses a labeller could not tell apart (equal but for surrounding whitespace)."""
    return a.strip() == b.strip()


def sample_pairs(prompts: list[str], policy_a: tuple, policy_b: tuple | None, generation: GenerationSettings,
                 seed: int, batch_size: int, max_prompt_tokens: int, redraws: int = 0) -> tuple[list[str], list[str]]:
    """``(responses_a, responses_b)`` for ``prompts``: two draws from ``policy_a`` (a ``(model, tokenizer)``),
    or one from it and one from ``policy_b``. While a pair's two responses are the same text, its ``b``
    response is drawn again, up to ``redraws`` times (seed ``seed + 1 + r`` for the r-th redraw)."""
    def draw(policy, texts: list[str], offset: int, progress: RowProgress | None) -> list[str]:
        torch.manual_seed(seed + offset)
        net, tokenizer = policy
        return decode(tokenizer, generate_ids(net, tokenizer, texts, generation, batch_size=batch_size,
                                              max_prompt_tokens=max_prompt_tokens, progress=progress))

    with RowProgress(len(prompts) * 2, "sample") as progress:
        if policy_b is None:
            both = draw(policy_a, prompts + prompts, 0, progress)  # one call: a prompt's two draws are independent
            responses_a, responses_b = both[:len(prompts)], both[len(prompts):]
        else:
            responses_a, responses_b = draw(policy_a, prompts, 0, progress), draw(policy_b, prompts, 1, progress)
    for redraw in range(1, redraws + 1):
        same = [i for i, (a, b) in enumerate(zip(responses_a, responses_b)) if same_text(a, b)]
        if not same:
            break
        for i, text in zip(same, draw(policy_b or policy_a, [prompts[i] for i in same], 1 + redraw, None)):
            responses_b[i] = text
    return responses_a, responses_b


def export_pairs(store: LabelStore, path: str, overwrite: bool) -> str:
    """Write the store's preferences as ``{"prompt", "chosen", "rejected"}`` JSON lines; returns the summary."""
    rows, skipped = preference_pairs(store.judgements())
    if not rows:
        raise UsageError(f"the store {store.url} holds no label that prefers one response "
                         f"({without_preference(skipped)}) - label pairs first")
    write_jsonl(rows, path, overwrite)
    return f"label: exported {len(rows)} preference pairs to {path} (left out: {without_preference(skipped)})"


def label(store: str = "sqlite:///labels.db", data: str | None = None, model: str | None = None,
          adapter: str | None = None, model_b: str | None = None, adapter_b: str | None = None,
          tokenizer: str | None = None, prompt_column: str = "prompt", template: str = "raw",
          max_prompts: PositiveInt | None = None, max_new_tokens: PositiveInt = 64, temperature: PositiveFloat = 1.0,
          top_k: int = 0, top_p: PositiveFloat = 1.0, batch_size: PositiveInt = 16, max_prompt_tokens: PositiveInt = 512,
          seed: int = 0, redraws: NonNegativeInt = 2, serve: bool = True, host: str = "127.0.0.1", port: PositiveInt = 8765,
          token: str | None = None, labeller: str | None = None, lease_seconds: PositiveFloat = 600.0,
          export: str | None = None, overwrite: bool = False, trust_remote_code: bool = False) -> str:
    """Sample pairs of responses, serve a page to judge them, and export the judgements.

    Args:
        store: the label store, a SQLAlchemy URL: ``sqlite:///labels.db`` (a file, made if missing) or a
            server database a team shares (``postgresql://user@host/labels``).
        data: prompts to sample pairs for: .txt (one per line) or .jsonl (``prompt_column``). Prompts
            the store already has a pair for (from the same sources) are skipped.
        model: the policy: a Hugging Face folder or hub id (a merged export, a base model).
        adapter: a LoRA adapter folder on ``model``.
        model_b: a second policy: each pair is one response from ``model`` and one from this
            (default: ``model`` when ``adapter_b`` is set; neither: two draws from ``model``).
        adapter_b: a LoRA adapter on ``model_b`` (or on ``model``).
        tokenizer: a tokenizer folder or hub id, or ``byt5``; default: the adapter's, else the model's.
        prompt_column: the .jsonl key holding each prompt.
        template: the prompt template: raw, summarize_dialogue, continue_text, or a string with {text}.
        max_prompts: sample for only the first N prompts of ``data``.
        max_new_tokens: the longest response, in tokens.
        temperature: the sampling temperature.
        top_k: sample from the k most likely tokens; 0 turns top-k off.
        top_p: nucleus sampling mass; 1.0 turns it off.
        batch_size: prompts per decoding call.
        max_prompt_tokens: prompts are truncated to this many tokens.
        seed: the sampling seed (and the draw of which response is shown on the left).
        redraws: while a pair's two responses are the same text, draw its second response again, up
            to this many times; pairs still the same are left out (nothing to choose between). A
            confident policy (a fine-tuned summariser) gives many such pairs.
        serve: serve the labelling page after sampling (``false``: only sample).
        host: the address to serve on. 127.0.0.1 (default) is this machine only; any other address
            needs a ``token`` (one is made and printed if none is given).
        port: the port to serve on.
        token: the token every labeller types into the page (needed off 127.0.0.1); default: the
            ``FLAN_RLHF_LABEL_TOKEN`` environment variable (other users can read a command line, not it).
        labeller: the name stored with each label unless the page sets one (default: your user name).
        lease_seconds: how long a served pair stays with its page before another page may get it.
        export: write the store's prompt/chosen/rejected pairs to this .jsonl file and stop.
        overwrite: replace ``export`` if it exists.
        trust_remote_code: allow model code from the hub (it runs with your rights).

    Returns:
        the closing summary.
    """
    if not serve and data is None and export is None:
        raise UsageError("nothing to do: pass --data to sample pairs, --serve true to label, or --export FILE")
    if data is None and any(option is not None for option in (model, adapter, model_b, adapter_b)):
        raise UsageError("a policy (--model/--adapter) samples pairs only for prompts: add --data prompts.jsonl")
    if export is not None and data is not None:
        raise UsageError("--export writes the labels already in the store; drop --data (sample and serve first)")
    path = sqlite_path(store)  # a bad URL is refused first
    if data is None and export is None and path is not None and not os.path.isfile(path):
        raise UsageError(f"no label store at {path} - pass --data prompts.jsonl and --model to sample pairs into it")
    database_files = {os.path.abspath(path) + suffix for suffix in ("", "-wal", "-shm", "-journal")} if path else set()
    if export is not None and os.path.abspath(export) in database_files:
        raise UsageError(f"--export {export} would write over the label store itself - name a .jsonl file")
    if data is not None:  # checked before the store is made
        prompts, generation = prompts_to_sample(data, model, prompt_column, template, max_prompts, max_new_tokens,
                                                temperature, top_k, top_p)
    labels = LabelStore(store, create=data is not None, lease_seconds=lease_seconds)
    try:
        if export is not None:
            return export_pairs(labels, export, overwrite)
        added = 0
        if data is not None:
            added = add_sampled_pairs(labels, prompts, generation, model, adapter, model_b, adapter_b, tokenizer,
                                      batch_size, max_prompt_tokens, seed, redraws, trust_remote_code)
        progress = labels.progress()
        summary = f"label: {added} new pairs; {progress['labelled']} of {progress['total']} labelled in {store}"
        if serve:
            if progress["total"] == 0:
                raise UsageError(f"the store {store} holds no pairs to label - pass --data prompts.jsonl and --model")
            serve_page(labels, host, port, token, labeller or user_name())
            progress = labels.progress()
            summary = f"label: {progress['labelled']} of {progress['total']} labelled in {store}"
        return summary
    finally:
        labels.close()


def user_name() -> str:
    """The login name, the default labeller (``labeller`` where there is none, as in some containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "labeller"


def prompts_to_sample(data: str, model: str | None, prompt_column: str, template: str, max_prompts: int | None,
                      max_new_tokens: int, temperature: float, top_k: int, top_p: float
                      ) -> tuple[list[str], GenerationSettings]:
    """``(prompts, decoding settings)`` of ``--data``, checked before anything is opened or made."""
    if model is None:
        raise UsageError("--data needs --model: the policy to sample the responses from")
    generation = check_generation_settings(GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p), "--", training=False)
    rows = read_prompts(data, prompt_column, template)[:max_prompts]
    return list(dict.fromkeys(row["prompt"] for row in rows)), generation  # a repeated prompt is one pair


def add_sampled_pairs(labels: LabelStore, prompts: list[str], generation: GenerationSettings, model: str,
                      adapter: str | None, model_b: str | None, adapter_b: str | None, tokenizer: str | None,
                      batch_size: int, max_prompt_tokens: int, seed: int, redraws: int, trust_remote_code: bool) -> int:
    """Sample and store a pair for each of ``prompts`` the store lacks; returns how many were added."""
    two_policies = model_b is not None or adapter_b is not None
    name_b = model_b or model
    source_a = source_of(model, adapter, generation, seed, 1)
    source_b = {**source_of(name_b, adapter_b, generation, seed, 1 if two_policies else 2), "redraws": redraws}
    have = labels.prompts_with_pairs(source_a, source_b)
    todo = [prompt for prompt in prompts if prompt not in have]
    if not todo:
        return 0
    started = time.perf_counter()
    net_a, tok_a, _ = load_generation_model(model, adapter, tokenizer, None, trust_remote_code)
    policy_b = None
    if two_policies:
        net_b, tok_b, _ = load_generation_model(name_b, adapter_b, tokenizer, None, trust_remote_code)
        policy_b = (net_b, tok_b)
    responses_a, responses_b = sample_pairs(todo, (net_a, tok_a), policy_b, generation, seed, batch_size,
                                            max_prompt_tokens, redraws)
    pairs = [{"prompt": prompt, "response_a": a, "response_b": b, "source_a": source_a, "source_b": source_b}
             for prompt, a, b in zip(todo, responses_a, responses_b) if not same_text(a, b)]
    added = labels.add_pairs(pairs, seed=seed)
    print(f"label: sampled {len(todo)} pairs in {seconds(time.perf_counter() - started)}; stored {added} "
          f"({len(todo) - added} with two identical responses after {redraws} redraws left out)", flush=True)
    return added


def serve_page(labels: LabelStore, host: str, port: int, token: str | None, labeller: str) -> None:
    """Serve the labelling page until Ctrl+C (uvicorn; one process, requests on its thread pool); off loopback
    with ``token`` (else ``FLAN_RLHF_LABEL_TOKEN``, else one made and printed)."""
    import uvicorn

    from flan_rlhf.tools.label_page import LOOPBACK_NAMES, create_app, is_loopback

    loopback = is_loopback(host)
    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if not loopback and token is None:
        token = secrets.token_urlsafe(16)
        print(f"label: serving on {host} needs a token; labellers type this one into the page: {token}", flush=True)
    app = create_app(labels, default_labeller=labeller, token=token,
                     allowed_hosts=LOOPBACK_NAMES if loopback else None)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # bound here, not by uvicorn, so a taken port is one line (uvicorn logs it and exits 1)
        listener = socket.create_server((host, port), family=family)
    except OSError as err:
        raise OSError(f"cannot serve on {host}:{port} ({err.strerror}) - pass another --port, or stop what uses it") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"label: open http://{shown}:{port}/ to label (keys 1 left, 2 right, 3 tie, 4 both unacceptable, "
          "U undo); Ctrl+C stops, every label is already saved", flush=True)
    set_activity("serving the labelling page", "every label given is saved; the same command serves the rest")
    with listener:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf label ...``; returns 0 on success, 2 on bad input (one line on stderr)."""
    return run_tool("label", argv, label, errors=(LabelStoreError, SettingsError))


if __name__ == "__main__":
    sys.exit(main())
