# `make test` and `make finetune` each create .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PYTEST_ARGS ?=

.PHONY: test finetune build lint clean

$(STAMP): requirements.txt setup.py
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental: ninja recompiles only the C++ files that changed.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

lint: $(STAMP)
	$(PY) -m ruff check .

test: build lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

finetune: build
	$(PY) -m train.finetune $(ARGS)

clean:
	rm -rf build *.egg-info vitcore/*.so
