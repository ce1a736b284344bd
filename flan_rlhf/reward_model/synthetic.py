"""A synthetic (prompt, chosen, rejected) preference set and a tiny reward-model config.

For tests and the offline smoke config (``configs/reward_model_tiny.yaml``): the chosen reply
is kind and the rejected reply insulting, built from the same sentence frames so that only the
sentiment words separate them. Different seeds give different pairs, so a model fit on one
seed is measured on pairs it has not seen.
"""
from __future__ import annotations

import random

from flan_rlhf.reward_model.data import PreferenceDataModule

PEOPLE = ["friend", "neighbour", "colleague", "teacher", "brother", "sister", "coach", "student"]
TOPICS = ["the report", "dinner", "the garden", "the trip", "the game", "the move", "the exam", "the party"]
KIND_WORDS = ["kind", "wonderful", "thoughtful", "brilliant", "generous", "lovely", "helpful", "amazing"]
RUDE_WORDS = ["stupid", "useless", "pathetic", "awful", "lazy", "horrible", "clueless", "worthless"]
KIND_CLOSINGS = ["thank you so much", "I really appreciate it", "you made my day", "I am grateful"]
RUDE_CLOSINGS = ["shut up already", "nobody cares", "you ruined it", "get lost"]
FRAMES = [
    "You are {a} and {b} about {topic}, {closing}.",
    "{Closing}, you were {a} with {topic} and so {b}.",
    "About {topic}: {a}, {b} work, {closing}.",
]

# A BERT small enough to fit the synthetic set in seconds on CPU. vocab_size 384 matches the
# byte-level ByT5 tokenizer (256 bytes + 3 specials + 125 sentinels), which needs no files.
TINY_REWARD_MODEL_CONFIG: dict = {
    "model_type": "bert",
    "vocab_size": 384,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}


def _reply(rng: random.Random, frame: str, topic: str, words: list[str], closings: list[str]) -> str:
    first, second = rng.sample(words, 2)
    closing = rng.choice(closings)
    capitalised = closing[0].upper() + closing[1:]
    return frame.format(a=first, b=second, topic=topic, closing=closing, Closing=capitalised)


def make_preference_pairs(num_pairs: int, seed: int = 0) -> list[dict[str, str]]:
    """``num_pairs`` records ``{"prompt", "chosen", "rejected"}``: chosen kind, rejected rude.

    Both replies of a pair use the same frame and topic; only the sentiment words differ.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    records = []
    for _ in range(num_pairs):
        person, topic, frame = rng.choice(PEOPLE), rng.choice(TOPICS), rng.choice(FRAMES)
        records.append(
            {
                "prompt": f"Reply to your {person} about {topic}.",
                "chosen": _reply(rng, frame, topic, KIND_WORDS, KIND_CLOSINGS),
                "rejected": _reply(rng, frame, topic, RUDE_WORDS, RUDE_CLOSINGS),
            }
        )
    return records


class SyntheticPreferenceDataModule(PreferenceDataModule):
    """:class:`PreferenceDataModule` over :func:`make_preference_pairs` (no files, no network).

    Args:
        num_train: training pairs (seed ``seed``).
        num_val: validation pairs (seed ``seed + 1``, so they are generated independently).
        seed: generator seed.
        batch_size: pairs per batch.
        num_workers: DataLoader workers.
        stream: an endless, resumable training stream (:class:`PreferenceDataModule`'s ``stream``; DPO).
    """

    def __init__(
        self,
        num_train: int = 192,
        num_val: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        stream: bool = False,
    ) -> None:
        super().__init__(
            dataset="synthetic",
            prompt_column="prompt",
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            stream=stream,
        )
        self.num_train = num_train
        self.num_val = num_val

    def prepare_data(self) -> None:
        """Nothing to download."""

    def _load_splits(self):
        from datasets import Dataset

        return (
            Dataset.from_list(make_preference_pairs(self.num_train, self.seed)),
            Dataset.from_list(make_preference_pairs(self.num_val, self.seed + 1)),
        )
