# Everything runs inside ./.venv, made by `make install` from the pinned requirements.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROMPT ?= The
PYTEST_ARGS ?=

.PHONY: install lint imports format test test-fast browser-test board-test run bench clean

install: $(STAMP)

# torch: on x86_64 the registry's torch is the CUDA build (it pulls ~20 nvidia-*/cuda-* packages,
# several GB); the compile side needs only the CPU build (rknn-toolkit2 imports torch, export reads
# .pth files). So torch comes first from its CPU wheel index where that index answers; where it
# does not, the pinned line in requirements.txt takes torch from the registry as before.
# rknn-toolkit2 pins torch<=2.4.0: it is installed with --no-deps after the rest, which already
# holds everything it needs (torch included).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PROBE := import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)

$(STAMP): requirements.txt requirements-toolkit.txt setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c '$(PROBE)' '$(TORCH_CPU_INDEX)' >/dev/null 2>&1; then \
		echo "torch: the CPU build from $(TORCH_CPU_INDEX)"; \
		$(BIN)/pip install --disable-pip-version-check -q --index-url '$(TORCH_CPU_INDEX)' \
			"$$(grep -E '^torch==' requirements.txt)"; \
	else \
		echo "torch: $(TORCH_CPU_INDEX) does not answer here; torch comes from the package registry"; \
	fi
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-toolkit.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

# The import rule (the contracts in setup.cfg), the linter and the formatter's check (ruff, configured
# in pyproject.toml; `make format` rewrites what the check refuses).
lint: imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# import-linter reads the folders of the package as installed, where passes/ and models/ are
# rwkv2rknn/passes and rwkv2rknn/models: it runs on a copy of the sources laid out that way.
IMPORT_VIEW := build/import-view
COPY_AS_INSTALLED := import shutil as s; i = s.ignore_patterns("__pycache__", "default", "*.md"); \
	s.copytree("rwkv2rknn", "$(IMPORT_VIEW)/rwkv2rknn", ignore=i); \
	s.copytree("passes", "$(IMPORT_VIEW)/rwkv2rknn/passes", ignore=i); \
	s.copytree("models", "$(IMPORT_VIEW)/rwkv2rknn/models", ignore=i)
imports: install
	rm -rf $(IMPORT_VIEW)
	$(BIN)/python -c '$(COPY_AS_INSTALLED)'
	cd $(IMPORT_VIEW) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports --no-cache $(CURDIR)/setup.cfg

# Reformat the Python files (ruff format, configured in pyproject.toml).
format: install
	$(BIN)/ruff format .

test: install lint
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The unit layer only: what is not marked slow.
test-fast: install
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

# The report in a real browser: headless Chromium from Debian's packages (installed here, as root).
browser-test: install
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q -m browser tests/tools/test_report_browser.py

# The board install (docs/board.md) in a Debian 12 arm64 userland under qemu-user (as root:
# apt-get, debootstrap, chroot; the userland is kept in $$ROOTFS). Not part of `make test`.
board-test: install
	sh tests/board/board_test.sh

run: install
	$(BIN)/rwkv2rknn demo --prompt "$(PROMPT)"

bench: install
	$(BIN)/rwkv2rknn bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
