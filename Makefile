# Two commands do all set-up: `make demo` and `make test` each create .venv when it is missing.
#
#   make demo              generated data set -> baseline vs proposed training -> results/demo/
#   make test              the test suite (CPU, no network)
#   make TORCH=system ...  keep the torch/torchvision of $(PYTHON) (e.g. a GPU box's CUDA build):
#                          the venv then sees the system site-packages and torch is not reinstalled.
#
# Versions are pinned in one place, constraints.txt (pyproject.toml keeps ranges).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= pinned
BIN := $(VENV)/bin
STAMP := $(VENV)/.reidlib-installed
DEMO_ARGS ?=

.PHONY: demo test install bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "setting up $(VENV) (first time: a few minutes, mostly torch)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(if $(filter system,$(TORCH)),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
ifeq ($(TORCH),system)
	grep -v -E '^(torch|torchvision)==' constraints.txt > $(VENV)/constraints-system-torch.txt
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(VENV)/constraints-system-torch.txt -e '.[dev]'
else
	# pip, not uv, for the matched torch pair: pip also finds wheels in the machine's local wheel folders.
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e '.[dev]'
endif
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	@touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m reidlib demo $(DEMO_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/eval_bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_bench.py

clean-demo:
	rm -rf data/synth results/demo
