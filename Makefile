# The two Quickstart commands (README): `make app` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: app test lint demo bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# Build the demo runs if absent (idempotent), then serve the app on 127.0.0.1.
# With NANOCHAT_BASE_DIR or NANOCHAT_REGISTRY_URL set, or APP_ARGS="--base-dir DIR" / "--db URL",
# the app opens that registry instead and the demo is not built.
app: $(STAMP)
	@if [ -z "$$NANOCHAT_BASE_DIR$$NANOCHAT_REGISTRY_URL$(APP_ARGS)" ]; then $(PY) -m scripts.demo; fi
	$(PY) -m streamlit run streamlit_app/app.py $(if $(APP_ARGS),-- $(APP_ARGS))

demo: $(STAMP)
	$(PY) -m scripts.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
