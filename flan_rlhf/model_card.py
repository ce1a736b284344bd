"""The model card (``README.md``) every export folder carries, made with ``huggingface_hub.ModelCard``
(the format the Hub renders: YAML metadata header, then Markdown).

:func:`export_card` builds it from :class:`CardFacts`; :func:`facts_from_settings` gathers those
from an RL run's settings (``PolicySpec``, ``LoraSettings``, ``PPOSettings`` or the RLOO / GRPO ones, the reward) and,
when a before/after report exists, its ``metrics.json``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Mapping

from flan_rlhf.interrupts import command_line

CARD_FILE = "README.md"
TAGS = ["flan-rlhf", "rlhf", "text2text-generation"]  # and the method's name in lower case (ppo, rloo, grpo)
# The settings a reader needs to judge and repeat a run (the rest are in the checkpoint); those a method lacks are skipped.
KEY_PPO_SETTINGS = ("learning_rate", "ppo_epochs", "mini_batch_size", "init_kl_coef", "adaptive_kl", "kl_target",
                    "cliprange", "vf_coef", "gamma", "lam", "samples_per_prompt", "kl_penalty", "loss_aggregation",
                    "scale_rewards", "beta", "loss_type", "label_smoothing")
#: what the policy was trained to do, by method (the card's first sentence)
AIMS = {"DPO": "trained to prefer the chosen over the rejected response of each preference pair (stored pairs, or "
               "its own samples ranked by the reward below), with beta keeping it close to the base"}
RL_AIM = "trained to raise the reward below while a KL penalty keeps it close to the base"
LOAD_SNIPPETS = {
    "adapter": ("from peft import AutoPeftModelForSeq2SeqLM\n"
                "model = AutoPeftModelForSeq2SeqLM.from_pretrained(\"{folder}\")"),
    "adapter-with-base": ("from peft import PeftModel\nfrom transformers import AutoModelForSeq2SeqLM\n"
                          "base = AutoModelForSeq2SeqLM.from_pretrained(\"{folder}/base\")\n"
                          "model = PeftModel.from_pretrained(base, \"{folder}\")"),
    "merged": "from transformers import AutoModelForSeq2SeqLM\nmodel = AutoModelForSeq2SeqLM.from_pretrained(\"{folder}\")",
    "int8": "from flan_rlhf.tools.quantize import load_int8\nmodel = load_int8(\"{folder}\")",
}


@dataclass
class CardFacts:
    """What a model card states.

    Attributes:
        export_format: ``adapter``, ``merged``, ``int8`` or ``full model``.
        base_model: the base's hub id or path; None when built from ``t5_config`` (saved in ``base/``).
        reward: the reward's description (class and name).
        steps: iterations trained.
        hyperparameters: ``{name: value}`` shown in a table (LoRA and the method's settings).
        metrics: a before/after ``metrics.json`` (:func:`flan_rlhf.eval.report.write_report`), if one exists.
        command: the command line that wrote the export.
        method: how the policy was trained.
    """

    export_format: str
    base_model: str | None
    reward: str | None = None
    steps: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] | None = None
    command: str = ""
    method: str = "PPO (RLHF) with LoRA"


def _plain(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if is_dataclass(value):
        return asdict(value)
    return dict(value) if isinstance(value, Mapping) else {}


def facts_from_settings(export_format: str, policy: Any, lora: Any, ppo: Any, reward: Any = None,
                        steps: int | None = None, metrics: Mapping[str, Any] | None = None,
                        command: str | None = None, algorithm: str = "PPO") -> CardFacts:
    """:class:`CardFacts` of an RL run from its settings (dataclasses or their dicts, as checkpoints store
    them); ``ppo`` is the algorithm's settings group, ``algorithm`` its name (``PPO``, ``RLOO``, ``GRPO``)."""
    policy, lora, ppo = _plain(policy), _plain(lora), _plain(ppo)
    hyperparameters: dict[str, Any] = {}
    if policy.get("quantization"):  # QLoRA: trained over a quantised base (flan_rlhf.policy.PolicySpec)
        hyperparameters["policy.quantization"] = policy["quantization"]
        if policy["quantization"] == "4bit":
            hyperparameters["policy.quant_type"] = policy.get("quant_type", "nf4")
    if lora:
        hyperparameters.update({f"lora.{key}": lora.get(key) for key in ("r", "alpha", "dropout", "target_modules")})
    prefix = algorithm.lower()
    hyperparameters.update({f"{prefix}.{key}": ppo[key] for key in KEY_PPO_SETTINGS if key in ppo})
    reward_text = reward if isinstance(reward, str) or reward is None else reward_description(reward)
    return CardFacts(export_format=export_format, base_model=policy.get("name_or_path"), reward=reward_text,
                     steps=steps, hyperparameters=hyperparameters, metrics=metrics,
                     command=command_line() if command is None else command, method=method_text(algorithm, bool(lora)))


def method_text(algorithm: str, lora: bool = True) -> str:
    """``"RLOO (RLHF) with LoRA"``: how a policy was trained, as a card states it."""
    return f"{algorithm} (RLHF) with LoRA" if lora else f"{algorithm} (RLHF), full fine-tuning"


def algorithm_of_export(manifest: Mapping[str, Any] | None) -> str:
    """The algorithm that wrote an export, from its manifest's ``written_by`` (``"flan-rlhf fit (RLOOModule)"``);
    ``PPO`` when it does not say (flan-rlhf trained only with PPO before RLOO and GRPO existed)."""
    from flan_rlhf.settings import METHOD_SETTINGS

    written_by = str((manifest or {}).get("written_by", ""))
    return next((key.upper() for key in METHOD_SETTINGS if f"({key.upper()}Module)" in written_by), "PPO")


def reward_description(reward: Any) -> str:
    """``"ProfanityReward (`non_profanity`)"``: a reward's class and name, for a card or a checkpoint
    (``None``, DPO on stored pairs: ``"none: stored preference pairs"``)."""
    if reward is None:
        return "none: stored preference pairs"
    name = getattr(reward, "name", None)
    return f"{type(reward).__name__}" + (f" (`{name}`)" if name else "")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(str(name)) and not os.path.isabs(str(name)) and str(name).count("/") == 1


def export_card(facts: CardFacts, folder_name: str = "."):
    """The :class:`huggingface_hub.ModelCard` of an export (``folder_name`` is used in the loading snippet)."""
    from huggingface_hub import ModelCard, ModelCardData

    from flan_rlhf.eval.report import markdown_table

    library = {"adapter": "peft", "int8": "flan-rlhf"}.get(facts.export_format, "transformers")
    data = ModelCardData(library_name=library, base_model=facts.base_model if _is_hub_id(facts.base_model) else None,
                         tags=[*TAGS, facts.method.split(" ", 1)[0].lower(), *(["lora"] if "LoRA" in facts.method else [])],
                         pipeline_tag="text2text-generation")
    base_text = f"`{facts.base_model}`" if facts.base_model else "a FLAN-T5-architecture model built from config (saved in `base/`)"
    snippet = "adapter-with-base" if facts.export_format == "adapter" and not facts.base_model else facts.export_format
    lines = [
        f"# {os.path.basename(os.path.abspath(folder_name))}", "",
        f"An encoder-decoder policy aligned with flan-rlhf: {facts.method} "
        f"from {base_text}, {AIMS.get(facts.method.split(' ', 1)[0], RL_AIM)}.", "",
        "## Training", "",
        f"- Method: {facts.method}",
        f"- Base model: {base_text}",
        f"- Reward: {facts.reward or 'not recorded'}",
        f"- {facts.method.split(' ', 1)[0]} iterations: {facts.steps if facts.steps is not None else 'not recorded'}",
        f"- Export format: {facts.export_format}", "",
    ]
    if facts.hyperparameters:
        lines += ["| hyperparameter | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in facts.hyperparameters.items()]
        lines.append("")
    lines += ["## Evaluation", ""]
    if facts.metrics:
        metrics = facts.metrics
        lines += [f"Reference (before) and this policy (after) on the same {metrics.get('n_prompts', '?')} prompts "
                  f"of the {metrics.get('split', 'evaluation')} split, {metrics.get('samples_per_prompt', '?')} "
                  "sample(s) per prompt, same sampling seeds; intervals are bootstrap over prompts.", "",
                  markdown_table(metrics), ""]
    else:
        lines += ["No before/after report was given. `flan-rlhf compare --config C --ckpt_path last --out REPORT` "
                  "writes one; `flan-rlhf export ... --report REPORT` puts its table here.", ""]
    lines += [
        "## Intended use and limits", "",
        "For research on reducing toxic or negative output of sequence-to-sequence models. The reward is an "
        "automatic scorer: the policy learns what that scorer rewards, including its blind spots, and the "
        "evaluation above uses automatic scorers too. Check outputs on your own data before relying on them; "
        "it is not a content filter.", "",
        "## How to load", "", "```python", LOAD_SNIPPETS[snippet if snippet in LOAD_SNIPPETS else "merged"].format(
            folder=folder_name), "```", "",
        "## Reproduce", "", "```bash", facts.command or "(command not recorded)", "```", "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(folder: str, facts: CardFacts, folder_name: str | None = None) -> str:
    """Write ``folder/README.md`` (replacing peft's generic card); returns its path."""
    path = os.path.join(folder, CARD_FILE)
    export_card(facts, folder_name or folder).save(path)
    return path
