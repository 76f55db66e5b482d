# Two commands do all set-up: `make demo` and `make test` each create .venv when it is missing.
#
#   make demo              generated data set -> baseline vs proposed training -> results/demo/
#   make test              lint (ruff), then the test suite and reidlib's doctests (CPU, no network)
#   make test-fast         lint, then the quick tier: everything but the tests marked slow (pretraining,
#                          notebooks, sweeps, whole training runs)
#   make test TEST_WORKERS=1   the tests in one process (default: 2 processes, pytest-xdist)
#   make TORCH=system ...  keep the torch/torchvision of $(PYTHON) (e.g. a GPU box's CUDA build):
#                          the venv then sees the system site-packages and torch is not reinstalled.
#   make lock              rewrite requirements.lock after editing constraints.txt or pyproject.toml
#                          (LOCK_ARGS=--upgrade moves every package to its newest allowed release)
#
# Versions: people pin in constraints.txt (pyproject.toml keeps ranges); requirements.lock, made from
# both by `make lock`, pins every package exactly, and the install takes every version from it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= pinned
BIN := $(VENV)/bin
STAMP := $(VENV)/.reidlib-installed
LOCK := requirements.lock
# The command that writes requirements.lock; the lock's header repeats it (tests/test_packaging.py checks).
LOCK_CMD := uv pip compile pyproject.toml --extra dev -c constraints.txt --universal --python-version 3.11 -o requirements.lock
LOCK_ARGS ?=
# The lock's packages that only torch/torchvision need: TORCH=system keeps the system's own. (sympy and
# mpmath are not among them: the ONNX exporter's onnx-ir needs them too; nor setuptools: tensorboard needs it.)
TORCH_ONLY := torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|networkx
DEMO_ARGS ?=
# The tests run in TEST_WORKERS processes (pytest-xdist), each test file in one of them (its session
# fixtures built once there; the pretrained miniature once for all), one CPU thread each: the tiny
# models gain nothing from threads, and on 2 cores two workers take about 10 minutes where one took 15.
TEST_WORKERS ?= 2
PYTEST_JOBS := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# BoxMOT (tracking with an exported model, tests/test_boxmot.py) goes in without its declared dependencies,
# which pull a CUDA torch and much else; the `track` extra lists the few its re-ID back-ends and trackers import.
BOXMOT := boxmot==25.0.0

.PHONY: demo test test-fast install lock bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	@echo "setting up $(VENV) (first time: a few minutes, mostly torch)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(if $(filter system,$(TORCH)),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade -c constraints.txt pip uv
ifeq ($(TORCH),system)
	grep -v -E '^($(TORCH_ONLY))==' $(LOCK) > $(VENV)/requirements-system-torch.lock
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(VENV)/requirements-system-torch.lock -e '.[dev]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps $(BOXMOT)
else
	# pip, not uv, for the matched torch pair: pip also finds wheels in the machine's local wheel folders.
	$(BIN)/python -m pip install -q -c constraints.txt -c $(LOCK) torch torchvision
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) -e '.[dev]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps $(BOXMOT)
endif
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	@touch $@

lock:
	@test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install -q --upgrade -c constraints.txt pip uv; }
	$(BIN)/$(LOCK_CMD) -q $(LOCK_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m reidlib demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check reidlib tests bench
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_JOBS)

test-fast: $(STAMP)
	$(BIN)/ruff check reidlib tests bench
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_JOBS)

bench: $(STAMP)
	$(BIN)/python bench/eval_bench.py
	$(BIN)/python bench/explore_bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_bench.py

clean-demo:
	rm -rf data/synth results/demo
