# One virtual environment for development, demo and tests. torch/torchvision are pinned to the
# builds that lie on this machine's disk (a bare `torch` would pull a multi-GB download).
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
MIXFX    := $(VENV)/bin/mixfx
PINS     := torch==2.14.1 torchvision==0.29.1 timm==1.0.31
STAMP    := $(VENV)/.mixfx-installed
OUT      ?= out

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PINS)
	$(PIP) install -q -e '.[test,timm,onnx]'
	$(PIP) install -q playwright
	-command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium chromium-driver >/dev/null; } || true
	touch $(STAMP)

install: $(STAMP)

## demo: analyse two bundled examples, then rewrite one (writes $(OUT)/)
demo: install
	$(MIXFX) analyze examples/resnet_cnn.py
	$(MIXFX) analyze examples/mlp_mixer.py
	mkdir -p $(OUT)
	$(MIXFX) rewrite examples/convnext_block.py --to conv -o $(OUT)/convnext_conv.pt

## test: the whole suite (installs everything it needs first)
test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) bench/analyze.py
	$(PY) bench/rewrite.py

clean:
	rm -rf $(OUT) .pytest_cache
