"""``flan-rlhf generate``: responses for a file of prompts, from any export of a policy.

``--model`` is a plain Hugging Face folder or hub id (a merged export, a base model), or an
int8 folder written by ``flan-rlhf export --format int8``; ``--adapter DIR`` puts a LoRA adapter on
top of ``--model`` (unmerged: slower than a merged export; the README's inference figures say by how much).

Prompts: ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (one object per line, the
prompt under ``--prompt_column``, default ``prompt``); ``--template`` wraps each (e.g.
``summarize_dialogue`` with ``--prompt_column dialogue`` for DialogSum-style rows). Output: JSONL
rows ``{"prompt", "response"}`` (plus the input row's ``id`` if it has one), in input order,
written atomically: the columns ``flan-rlhf score`` reads by default, so the two pipe::

    flan-rlhf generate --model exports/merged --input prompts.txt --output responses.jsonl
    flan-rlhf score --reward ProfanityReward --input responses.jsonl --output scored.jsonl
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any, Literal, Sequence

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from flan_rlhf.io import TextFileError, atomic_file, file_format, read_utf8
from flan_rlhf.progress import RowProgress, seconds
from flan_rlhf.rollout import fused_generate
from flan_rlhf.settings import GenerationSettings, check_generation_settings
from flan_rlhf.tools.command import UsageError, run_tool

DTYPE_CHOICES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- prompts
def read_prompts(path: str, prompt_column: str = "prompt", template: str = "raw") -> list[dict[str, Any]]:
    """Rows ``{"prompt": templated text, "id"?: ...}`` from a ``.txt`` or ``.jsonl`` file, in file order."""
    from flan_rlhf.data.templates import resolve_template

    template = resolve_template(template)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input '{path}' does not exist - pass a .txt (one prompt per line) or .jsonl file")
    kind = file_format(path)
    if kind not in ("txt", "jsonl"):
        raise ValueError(f"--input '{path}' must end in .txt (one prompt per line) or .jsonl")
    try:
        text = read_utf8(path)
    except TextFileError as err:
        raise ValueError(f"--input '{path}' is not UTF-8 text (it holds byte {err.byte:#04x}) - "
                         "pass a .txt (one prompt per line) or .jsonl file saved as UTF-8") from None
    rows = _read_prompt_rows(path, text, kind, prompt_column, template)
    if not rows:
        raise ValueError(f"--input '{path}' holds no prompts")
    return rows


def _read_prompt_rows(path: str, text: str, kind: str, field: str, template) -> list[dict[str, Any]]:
    """The rows of ``text``, the file's content (``kind``: ``"txt"`` or ``"jsonl"``)."""
    from flan_rlhf.data.templates import apply_template

    lines = io.StringIO(text, newline=None)  # universal newlines, as open() in text mode
    if kind == "txt":
        return [{"prompt": apply_template(template, line.rstrip("\n"))} for line in lines if line.strip()]
    rows: list[dict[str, Any]] = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({err.msg}) - write one JSON object per line") from err
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{line_no} has no string '{field}' - pass --prompt_column with the key holding the prompt")
        row = {"prompt": apply_template(template, record[field])}
        if "id" in record:
            row["id"] = record["id"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- models
def load_generation_model(model: str, adapter: str | None = None, tokenizer: str | None = None,
                          dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load any export for generation.

    Returns:
        ``(model, tokenizer, kind)`` with ``kind`` one of ``"int8"``, ``"adapter"``, ``"hf"``.
    """
    from flan_rlhf.policy import load_seq2seq_model, load_tokenizer
    from flan_rlhf.tools.quantize import is_int8_folder, load_int8

    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "adapter_config.json")):
        raise UsageError(f"--model '{model}' is a LoRA adapter folder - pass its base as --model and this folder as --adapter")
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter '{adapter}' has no adapter_config.json - pass a folder written by `flan-rlhf export --format adapter`")
    if tokenizer is None:
        has_own = adapter is not None and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
        tokenizer = adapter if has_own else model
    tok = load_tokenizer(tokenizer, trust_remote_code)
    tok.padding_side = "right"  # T5's native padding (TRL PR #262)
    if os.path.isdir(model) and is_int8_folder(model):
        if adapter is not None:
            raise UsageError("an int8 export already has its adapter merged - drop --adapter")
        if dtype not in (None, torch.float32):
            raise UsageError("int8 exports compute in int8/fp32 - drop --dtype")
        return load_int8(model), tok, "int8"
    net = load_seq2seq_model(model, trust_remote_code)
    kind = "hf"
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
        kind = "adapter"
    if dtype is not None:
        net = net.to(dtype)
    net.config.use_cache = True
    return net.eval(), tok, kind


# ----------------------------------------------------------------------------- generation
@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: Sequence[str], generation: GenerationSettings, batch_size: int = 16,
                 max_prompt_tokens: int = 512, fused: bool = True,
                 progress: RowProgress | None = None) -> list[list[int]]:
    """Response token ids for each prompt, in input order.

    Args:
        generation: any decoding settings: ``max_new_tokens``, ``min_new_tokens`` (a benchmark sets
            it equal to ``max_new_tokens`` so every model does the same work), ``do_sample`` (False:
            greedy), the sampling warpers, beam search and the repetition settings.
        batch_size: prompts per ``generate`` call.
        max_prompt_tokens: prompts are truncated to this many tokens.
        fused: T5-family float models sample or decode greedily through the package's fused decoder
            (:func:`flan_rlhf.rollout.fused_generate`: the same tokens as ``generate``, LoRA folded
            into the weights once per batch); ``False``, any other model, beam search or a repetition
            setting: ``model.generate``.
        progress: advanced by the number of prompts of each batch.

    Prompts are batched in order of token length (less padding) and put back in input order.
    Each response runs up to and including its first EOS (the decoder start token and the
    padding after EOS are dropped).

    Returns:
        ``len(prompts)`` lists of token ids.
    """
    if batch_size < 1 or generation.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    kwargs = dict(pad_token_id=pad_id, eos_token_id=eos_id, **generation.generate_kwargs())
    device = next(model.parameters()).device
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers inside
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in batch], padding=True, truncation=True,
                        max_length=max_prompt_tokens, return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        responses = fused_generate(plain, input_ids, attention_mask, generation, tokenizer) if fused else None
        if responses is None:
            responses = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, 1:]  # no start token
        for row, index in zip(responses.tolist(), batch):
            results[index] = row[: row.index(eos_id) + 1] if eos_id in row else row
        if progress is not None:
            progress.update(len(batch))
    return results


def decode(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Response strings (special tokens removed)."""
    return tokenizer.batch_decode([list(x) for x in ids], skip_special_tokens=True)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str, overwrite: bool = False) -> None:
    """Write rows as JSONL through :func:`flan_rlhf.io.atomic_file` (no half-written output)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output '{path}' is a folder - pass a .jsonl file path")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"--output '{path}' already exists - pass --overwrite true to replace it")
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(model: str, input: str, output: str, adapter: str | None = None, tokenizer: str | None = None,
             prompt_column: str = "prompt", template: str = "raw", greedy: bool = False,
             max_new_tokens: PositiveInt = 64, batch_size: PositiveInt = 16, max_prompt_tokens: PositiveInt = 512,
             temperature: PositiveFloat = 1.0, top_k: NonNegativeInt = 0, top_p: PositiveFloat = 1.0,
             min_new_tokens: NonNegativeInt = 0, num_beams: PositiveInt = 1, repetition_penalty: PositiveFloat = 1.0,
             no_repeat_ngram_size: NonNegativeInt = 0, length_penalty: float = 1.0, seed: int = 0,
             dtype: Literal["auto", "fp32", "bf16"] = "auto", threads: PositiveInt | None = None,
             hf_generate: bool = False, overwrite: bool = False, trust_remote_code: bool = False) -> str:
    """Responses for a file of prompts from an export, a base model or an adapter.

    Args:
        model: a Hugging Face model folder or hub id (a merged export, a base model), or an int8
            export folder.
        input: the prompts: .txt (one per non-empty line) or .jsonl (one object per line).
        output: the .jsonl file to write, one ``{"prompt", "response"}`` row per prompt (plus the
            input's ``id``), in input order.
        adapter: a LoRA adapter folder to apply on ``model`` (unmerged).
        tokenizer: a tokenizer folder or hub id, or ``byt5``; default: the adapter's, else the model's.
        prompt_column: the .jsonl key holding each prompt.
        template: the prompt template: raw, summarize_dialogue, continue_text, or a string with {text}.
        greedy: greedy decoding instead of sampling.
        max_new_tokens: the longest response, in tokens.
        batch_size: prompts per decoding call.
        max_prompt_tokens: prompts are truncated to this many tokens.
        temperature: the sampling temperature.
        top_k: sample from the k most likely tokens; 0 turns top-k off.
        top_p: nucleus sampling mass; 1.0 turns it off.
        min_new_tokens: the shortest response: EOS is banned before this many tokens.
        num_beams: beam search width (with ``--greedy``: beam search; without: beam sampling); 1 turns it off.
        repetition_penalty: CTRL's penalty on tokens already in the response (above 1 discourages
            repeats); 1.0 turns it off.
        no_repeat_ngram_size: never repeat an n-gram of this size; 0 turns it off.
        length_penalty: beam search's length exponent (above 0 favours longer responses); needs
            ``--num_beams`` above 1.
        seed: the sampling seed.
        dtype: cast a float model to this dtype (auto: as saved).
        threads: torch.set_num_threads (default: torch's choice).
        hf_generate: decode with transformers' generate instead of the fused T5 decoder (the
            same tokens, slower).
        overwrite: replace ``output`` if it exists.
        trust_remote_code: allow model code from the hub (it runs with your rights).

    Returns:
        the closing summary: how many responses, from what, and where.
    """
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"--output '{output}' already exists - pass --overwrite true to replace it")
    generation = check_generation_settings(GenerationSettings(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=not greedy, temperature=temperature,
        top_k=top_k, top_p=top_p, num_beams=num_beams, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty), "--", training=False)
    rows = read_prompts(input, prompt_column, template)
    net, tok, kind = load_generation_model(model, adapter, tokenizer, DTYPE_CHOICES[dtype], trust_remote_code)
    torch.manual_seed(seed)
    with RowProgress(len(rows), "generate") as progress:
        ids = generate_ids(net, tok, [row["prompt"] for row in rows], generation, batch_size=batch_size,
                           max_prompt_tokens=max_prompt_tokens, fused=not hf_generate, progress=progress)
    out_rows = [{**({"id": row["id"]} if "id" in row else {}), "prompt": row["prompt"], "response": text}
                for row, text in zip(rows, decode(tok, ids))]
    write_jsonl(out_rows, output, overwrite)
    return (f"generate: {len(out_rows)} responses ({kind} model, {generation.mode}) "
            f"in {seconds(time.perf_counter() - started)}\n  rows: {len(out_rows)} in {output}")


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf generate ...``; returns 0 on success, 2 on bad input (one line on stderr)."""
    return run_tool("generate", argv, generate)


if __name__ == "__main__":
    sys.exit(main())
