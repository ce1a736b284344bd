"""flan-rlhf: RLHF-PPO for FLAN-T5 and any Hugging Face encoder-decoder, with LoRA, on Lightning."""

__version__ = "0.1.0"
