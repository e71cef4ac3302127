# Set-up and everyday commands. `make train` and `make test` each set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for CPU machines (served from local disk); setup.py itself stays loose.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv train test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PINS)
	$(VENV)/bin/pip install -q -e ".[dev,deepspeed]"
	touch $@

train: venv
	$(PY) launch/train.py

test: venv
	$(PY) -m pytest -q --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
