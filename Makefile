# `make test` and `make demo` work from a fresh clone: they create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned CUDA build this machine keeps on local disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,all]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m zoo.demo

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/moe_ops.py
	$(PY) benchmarks/moe_small.py
	$(PY) benchmarks/task_speed.py --out runs/task_speed.csv

clean:
	rm -rf runs .pytest_cache
