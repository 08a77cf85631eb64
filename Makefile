# Two commands do all the setup on a fresh clone (see README):
#   make demo   create .venv, install, train the digits example and run attribution on it
#   make test   create .venv, install, run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml infra/constraints.txt | cksum | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml infra/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	# On a CUDA machine, install your CUDA torch into .venv instead and `touch $(STAMP)`.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -c infra/constraints.txt -e ".[test]"
	# optional baselines (EK-FAC, TRAK): kronfluence declares torchvision, which breaks CPU torch; without
	# --no-warn-conflicts pip ended `make demo` on a fresh clone by reporting that conflict, made on purpose,
	# as an error
	$(BIN)/pip install -q --no-deps --no-warn-conflicts "kronfluence==1.0.1" "traker==0.3.2" "devinterp==2.0.1" && \
	  $(BIN)/pip install -q --no-warn-conflicts -c infra/constraints.txt \
	    accelerate datasets einconv einops opt_einsum safetensors tqdm || \
	  echo "optional baselines not installed; their tests will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f runs/example/digits.pt || $(BIN)/bif example digits runs/example/digits.pt
	$(BIN)/bif run bif/examples/digits.yaml

# TEST_WORKERS=2 (the default) runs the suite on two pytest-xdist workers: each test file (or group of files
# sharing a session fixture) runs whole in one worker, longest first (tests/conftest.py); TEST_WORKERS=0 runs it
# in one process. The whole default suite on the 2-core machine, back to back on 2026-12-02: 1,421 s in one
# process (.ci/run), 1,047 and 1,194 s on two workers. (Two files alone, test_sampler + test_runtime, were 1.15x
# slower on two workers in an earlier session: most of the suite waits on servers and subprocesses, they do not.)
TEST_WORKERS ?= 2
PYTEST_XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile --max-worker-restart=2)

# A hung test fails after 600 s (pyproject.toml). A default suite still running 60 min after it started (a healthy
# one takes 9-28 min on the 2-core CI machine) stops after the tests in hand and prints its summary, failures
# included (--suite-deadline, tests/ci_watch.py: one deadline for all xdist workers, replacements of crashed ones
# included), so CI's 90 min never end in a bare timeout that names no test. Crashed workers are replaced twice,
# then the run ends (--max-worker-restart). The header describes the machine and each failure prints as it
# happens; PYTHONFAULTHANDLER makes every Python process of the run (Dask workers too) print its stack when it
# crashes.
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest $(PYTEST_XDIST) --suite-deadline=3600

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_XDIST) -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.plot

clean:
	rm -rf $(VENV) runs .pytest_cache
