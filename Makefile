# The two commands of README.md. Both install what they need first (scripts/install.sh is
# idempotent and returns in about a second when everything is in place).
PY ?= python3
PYTEST_ARGS ?= --durations=15

.PHONY: install lint test train bench

install:
	bash scripts/install.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy shared learner/algo

test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

train: install
	$(PY) -m deploy.cli train configs/tiny_cpu.yaml

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done
