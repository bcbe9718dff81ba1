# Set-up and everyday commands. Everything installs into .venv with pip (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

SPINELEVEL := $(VENV)/bin/spinelevel
DEMO := demo-out

.PHONY: install test demo bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,train,gpu,ray,gdcm,dicomweb,openvino]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

# The whole system on a fresh machine: phantom archive (studies the demo model never saw) -> run ->
# evaluate -> review report, all under ./demo-out.
demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(SPINELEVEL) phantom $(DEMO)/archive --studies 4 --seed 9001 --size 256 --compression mixed --quiet
	$(SPINELEVEL) run $(DEMO)/archive --model demo --out $(DEMO)/run
	$(SPINELEVEL) evaluate $(DEMO)/run --labels $(DEMO)/archive/labels.parquet --vertebrae $(DEMO)/archive/vertebrae.parquet --out $(DEMO)/evaluation
	$(SPINELEVEL) report $(DEMO)/run --out $(DEMO)/report --metrics $(DEMO)/evaluation
	@echo "demo: Parquet in $(DEMO)/run, metrics in $(DEMO)/evaluation/metrics.json, review page $(DEMO)/report/index.html"

bench-quick: $(VENV)/.installed
	$(SPINELEVEL) bench --quick --out benchmarks/results/bench_quick.json

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
