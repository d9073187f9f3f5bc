# All set-up happens here: `make demo` and `make test` build their own virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
# Where no NVIDIA GPU is present, install the small CPU build of torch before the package,
# so that pyproject's open `torch>=2.4` range does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test test-quick lint typecheck clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "no GPU found: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(PY) -m pip install -q "$(TORCH_CPU)" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: venv  # a fresh network each time: the previous demo's state would otherwise be resumed
	rm -rf runs/demo
	$(VENV)/bin/gradpool simulate --miners 3 --rounds 12 --out runs/demo
	@echo "--- what the network learned (gradpool generate, version of the last round):"
	@$(VENV)/bin/gradpool generate --state-dir runs/demo/coordinator --prompt "def " --max-new-tokens 160 \
		--temperature 0.6
	@echo "--- the run's signed history, verified and replayed (gradpool audit):"
	@$(VENV)/bin/gradpool audit --state-dir runs/demo/coordinator

test: venv  # the type check runs beside the tests (three workers, pyproject.toml); either failing fails it
	$(VENV)/bin/ruff check protocol coordinator node gradpool tests benchmarks
	$(VENV)/bin/ruff format --check protocol coordinator node gradpool tests benchmarks
	@$(VENV)/bin/mypy > $(VENV)/mypy.log 2>&1 & types=$$!; \
	$(PY) -m pytest -q; tests=$$?; \
	wait $$types; typed=$$?; echo "--- mypy:"; cat $(VENV)/mypy.log; \
	[ $$tests -eq 0 ] && [ $$typed -eq 0 ]

test-quick: venv  # the fast tiers: everything but the tests marked slow
	$(VENV)/bin/ruff check protocol coordinator node gradpool tests benchmarks
	$(VENV)/bin/ruff format --check protocol coordinator node gradpool tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check protocol coordinator node gradpool tests benchmarks
	$(VENV)/bin/ruff format --check protocol coordinator node gradpool tests benchmarks

typecheck: venv
	$(VENV)/bin/ruff format --check protocol coordinator node gradpool tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
