# Everything runs inside ./.venv, made by `make install` from the pinned requirements.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROMPT ?= The
PYTEST_ARGS ?=

.PHONY: install test browser-test run bench clean

install: $(STAMP)

# rknn-toolkit2 pins torch<=2.4.0 (a multi-GB CUDA build from the registry): it is installed
# with --no-deps after the rest, which already holds everything it needs (torch CPU included).
$(STAMP): requirements.txt requirements-toolkit.txt setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-toolkit.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

test: install
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The report in a real browser: headless Chromium from Debian's packages (installed here, as root).
browser-test: install
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q -m browser tests/test_report_browser.py

run: install
	$(BIN)/rwkv2rknn demo --prompt "$(PROMPT)"

bench: install
	$(BIN)/rwkv2rknn bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
