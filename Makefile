# `make test` and `make finetune` each create .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
EXT     := .venv/.extension-built
EXT_SRC := $(wildcard csrc/*.cpp csrc/*.h) setup.py
PYTEST_ARGS ?=

.PHONY: test finetune build lint clean

# `pip install -e .` also compiles the extension in place, so the extension counts as built here.
$(STAMP): requirements.txt setup.py
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP) $(EXT)

# Rebuilt when a C++ source changes; ninja then recompiles only the files that changed.
$(EXT): $(EXT_SRC) | $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	touch $(EXT)

build: $(STAMP) $(EXT)

lint: $(STAMP)
	$(PY) -m ruff check .

test: build lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

finetune: build
	$(PY) -m train.finetune $(ARGS)

clean:
	rm -rf build *.egg-info vitcore/*.so $(EXT)
