# satloc: the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_DIR ?= demo_out

.PHONY: venv test demo bench quality clean-venv

venv: $(STAMP)

# Built once; rebuilt only when pyproject.toml changes (the stamp carries its hash).
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat: a .pth puts the repo root on sys.path, so scripts run from any directory
	# (and Ray workers) import model/ and pipeline/ as regular packages.
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python jobs/demo.py --workdir $(DEMO_DIR)

bench: venv
	$(BIN)/python bench/bench_model.py

quality: venv
	$(BIN)/python bench/bench_quality.py

clean-venv:
	rm -rf $(VENV)

# Local Ray head + SeaweedFS S3 endpoint, and a `ray job submit` of the localize job: infra/local/cluster.mk
-include infra/local/cluster.mk
