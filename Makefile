# Two commands for a fresh machine:
#   make demo   - create .venv, install, run the offline RLHF demo (corpus -> tokenizer -> SFT -> RLOO -> before/after report)
#   make test   - create .venv if missing, install with test extras (and Debian's chromium for the browser test), run the test suite
# On a GPU machine pass the torch you want, e.g. `make demo TORCH_SPEC="torch==2.13.0"` (PyPI's Linux wheel is CUDA).
# Another RL method for the demo: `make demo METHOD=ppo` (or grpo; RLOO is the default: docs/time-to-detox.md);
# other demo options: DEMO_ARGS="--seed 1".
# The harder demo task, insults woven into the summaries: `make demo TASK=woven` (default TASK=tail;
# artefacts in artifacts/demo-woven, reports in reports/demo-woven).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed FIRST and pinned: on a CPU-only machine with no torch, a range (torch>=2.3)
# resolves to a multi-GB CUDA build. With 2.13.0 already installed, `pip install -e .` keeps it.
TORCH_SPEC ?= torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=
DEMO_ARGS ?=
METHOD ?= rloo
TASK ?= tail

.PHONY: install demo demo-rebuild test tiny bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# the tests also run the optional loggers (W&B offline, MLflow on local files): docs/logging.md
$(VENV)/.installed-loggers: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,wandb,mlflow]"
	touch $@

# and QLoRA's bitsandbytes, whose 4-/8-bit layers run on CPU too (tests/test_qlora.py, docs/scaling.md)
$(VENV)/.installed-qlora: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,qlora]"
	touch $@

demo: install
	$(OFFLINE) $(BIN)/flan-rlhf demo --method $(METHOD) --task $(TASK) $(DEMO_ARGS)

demo-rebuild: install
	$(OFFLINE) $(BIN)/flan-rlhf demo --method $(METHOD) --task $(TASK) --rebuild true $(DEMO_ARGS)

tiny: install
	$(OFFLINE) $(BIN)/flan-rlhf fit --config configs/tiny.yaml

# Debian's chromium and chromium-driver, for the labelling page's browser test (tests/tools/test_label_browser.py,
# driven by Selenium; no browser download). Needs root or sudo; without them those tests skip, except in CI.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
	  || echo "make browser: could not install chromium + chromium-driver (apt-get); the browser tests will skip"; fi

test: install $(VENV)/.installed-loggers $(VENV)/.installed-qlora browser
	$(OFFLINE) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(OFFLINE) $(BIN)/python benchmarks/ppo_throughput.py --lora
	$(OFFLINE) $(BIN)/python benchmarks/ppo_throughput.py

clean:
	rm -rf artifacts checkpoints reports lightning_logs/*/ .pytest_cache
