# One virtual environment for development, demo and tests. torch/torchvision are pinned to the
# builds that lie on this machine's disk (a bare `torch` would pull a multi-GB download).
# `make demo` installs Python packages into $(VENV) only; the browser the HTML test drives
# (Playwright + a system Chromium) is installed by `make test` alone, and says so.
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
MIXFX    := $(VENV)/bin/mixfx
PINS     := torch==2.14.1 torchvision==0.29.1 timm==1.0.31
STAMP    := $(VENV)/.mixfx-installed
BROWSER  := $(VENV)/.mixfx-browser
OUT      ?= out

.PHONY: install browser demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PINS)
	$(PIP) install -q -e '.[test,timm,onnx]'
	touch $(STAMP)

install: $(STAMP)

# test-only: Playwright (pip, into $(VENV)) and, when run as root on Debian/Ubuntu without one,
# the system's Chromium (apt-get). tests/test_html.py skips its browser check without them.
$(BROWSER): $(STAMP)
	@echo "make test: installing playwright into $(VENV) (pip) for the HTML report's browser test"
	$(PIP) install -q playwright
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  echo "make test: using the installed chromium"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "make test: installing the system packages chromium chromium-driver (apt-get)"; \
	  apt-get install -y -q chromium chromium-driver >/dev/null || echo "make test: apt-get failed; the browser test will be skipped"; \
	else \
	  echo "make test: no chromium and not root: the browser test will be skipped"; \
	fi
	touch $(BROWSER)

browser: $(BROWSER)

## demo: analyse two bundled examples, then rewrite one (writes $(OUT)/); installs nothing outside $(VENV)
demo: install
	$(MIXFX) analyze examples/resnet_cnn.py
	$(MIXFX) analyze examples/mlp_mixer.py
	mkdir -p $(OUT)
	$(MIXFX) rewrite examples/convnext_block.py --to conv -o $(OUT)/convnext_conv.pt

## test: the whole suite (pytest's options, -q included, are in pyproject.toml)
test: install browser
	$(PY) -m pytest -p no:cacheprovider

bench: install
	$(PY) bench/analyze.py
	$(PY) bench/rewrite.py

clean:
	rm -rf $(OUT) .pytest_cache
