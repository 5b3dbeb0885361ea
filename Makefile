# The two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both install everything first (apt and pip; idempotent), so they work on a fresh machine.
PYTHON ?= python3

.PHONY: install demo test benchmark

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) examples/audit_fashion_mnist.py

test: install
	$(PYTHON) -m pytest -q tests

benchmark: install
	$(PYTHON) benchmarks/reconstruction_throughput.py
