# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
# The `distributed` extra (ray) is installed too, so the suite covers the parallel verification path.
# torch is installed first, pinned, because a bare `torch` requirement would pull a
# multi-GB CUDA build; constraints.txt keeps every later pip call on that build.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.stso-installed
PIP    := $(VPY) -m pip install --disable-pip-version-check -q

.PHONY: venv train test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev,distributed]'
	@touch $(STAMP)

venv: $(STAMP)

# The main job on defaults that need nothing outside this repository: collect real tiny runs
# (built-in corpus, spiky scenario), fit the proxy, learn a MaskablePPO controller in
# STSO-Proxy-v0 and test it on held-out real runs against the fixed schedule.
train: $(STAMP)
	$(VPY) -m agents.train_controller --run-name train-controller --overwrite

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) -m agents.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check stso_env agents tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
