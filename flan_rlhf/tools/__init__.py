"""The tool subcommands of ``flan-rlhf`` (export, generate, score, compare): thin commands over the core."""
