# The two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both install everything first (apt and pip; idempotent), so they work on a fresh machine.
PYTHON ?= python3

.PHONY: install demo test test-oldest test-newest benchmark

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) examples/audit_fashion_mnist.py

test: install
	$(PYTHON) -m pytest -q tests

# The tests again, against the oldest torch / torchvision / opacus / diffusers that pyproject.toml admits.
test-oldest: install
	bash scripts/test_oldest.sh

# The tests again, against the newest releases on PyPI, as a fresh pip install resolves them (not in CI).
# NEWEST_PYTHON=/path/to/python picks the interpreter.
test-newest: install
	bash scripts/test_newest.sh

# The CPU-sized benchmark suite (about 8 min on 2 cores); on a GPU machine see benchmarks/gpu_perf.sh.
RESULTS ?= benchmarks/results/cpu
benchmark: install
	$(PYTHON) benchmarks/reconstruction_throughput.py --arch fashion-32 --json $(RESULTS)/throughput-fashion-32.json
	$(PYTHON) benchmarks/end_to_end_audit.py --json $(RESULTS)/end-to-end.json
	$(PYTHON) benchmarks/speed_quality.py --json $(RESULTS)/speed-quality.json
	$(PYTHON) benchmarks/auditor_overhead.py --steps 30 --json $(RESULTS)/auditor-overhead.json
	$(PYTHON) benchmarks/shadow_step.py --batch 64 --size 28 --channels 1 --repeats 20 --json $(RESULTS)/shadow-step-28.json
	$(PYTHON) benchmarks/shadow_step.py --batch 64 --size 256 --json $(RESULTS)/shadow-step-256.json
	$(PYTHON) benchmarks/imprint_rounding.py --json $(RESULTS)/imprint-rounding.json
	$(PYTHON) benchmarks/scale_estimates.py --json $(RESULTS)/scale-estimates.json
