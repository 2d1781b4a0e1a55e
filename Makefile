# Quick start: `make serve` (serve the bundled models on 127.0.0.1:8000), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch; only training, evaluation, export and the test suite need it.
TORCH_SPEC ?= torch==2.13.0
NLTK_DATA ?= $(abspath ../shared/data/nltk_data)
WIKITEXT ?= $(abspath ../shared/data/wikitext-2-valid.txt)
CORPORA := brown movie_reviews abc state_union webtext inaugural

.PHONY: serve test lint lock docs bench baseline train-bundled evaluate-bundled clean

# Locked versions (requirements/*.txt, written by `make lock`; never edit them by hand),
# installed hash-checked; then the project itself with --no-deps, and `pip check` proves
# the lock covers what pyproject.toml declares. The runtime lock of this platform: on
# Linux the project asks for onnxruntime-gpu, on macOS for onnxruntime.
LOCK := requirements
RUNTIME_LOCK := $(LOCK)/$(if $(filter Darwin,$(shell uname -s)),runtime.txt,runtime-gpu.txt)
UV_SPEC ?= uv==0.13.9
# Where uv finds the CPU build of torch whose dependencies dev.txt pins (torch itself is not
# in the lock): this machine's wheel directory, else the PyTorch CPU index.
LOCK_TORCH ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),--find-links /opt/wheels,--torch-backend cpu)
# `make lock LOCK_UPGRADE=--upgrade` moves every pin to the newest release allowed.
LOCK_UPGRADE ?=
UV_COMPILE = $(VENV)/bin/uv pip compile -q --generate-hashes $(LOCK_UPGRADE) \
  --custom-compile-command "make lock  (uv pip compile from pyproject.toml; see the Makefile)"

$(VENV)/.runtime: pyproject.toml $(RUNTIME_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install --require-hashes -r $(RUNTIME_LOCK)
	$(PIP) install --no-deps -e .
	$(PIP) check
	touch $@

# torch first (TORCH_SPEC, the CPU build): dev.txt leaves it out but pins its dependencies.
$(VENV)/.dev: $(VENV)/.runtime $(LOCK)/dev.txt
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --require-hashes -r $(LOCK)/dev.txt
	$(PIP) install --no-deps -e ".[train,dev]"
	$(PIP) check
	touch $@

# runtime.txt: the CPU image (onnxruntime); runtime-gpu.txt: the GPU image (onnxruntime-gpu);
# both for every platform and Python >= 3.10. dev.txt: the train and dev extras for Linux
# x86-64 and CPython 3.11 with the CPU build of torch, which it leaves out (TORCH_SPEC
# installs it). Pins agree across the three: each is resolved within the ones before it.
lock:  ## regenerate requirements/*.txt from pyproject.toml (uv pip compile)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(UV_SPEC)"
	mkdir -p $(LOCK)
	$(PY) docker/runtime_requirements.py pyproject.toml --onnxruntime onnxruntime \
	  | $(UV_COMPILE) --universal --python-version 3.10 - -o $(LOCK)/runtime.txt
	$(PY) docker/runtime_requirements.py pyproject.toml --onnxruntime onnxruntime-gpu \
	  | $(UV_COMPILE) --universal --python-version 3.10 - -c $(LOCK)/runtime.txt \
	    -o $(LOCK)/runtime-gpu.txt
	echo "$(TORCH_SPEC)" | $(UV_COMPILE) pyproject.toml --extra train --extra dev \
	  -c $(LOCK)/runtime.txt -c $(LOCK)/runtime-gpu.txt -c /dev/stdin $(LOCK_TORCH) \
	  --no-emit-package torch --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  -o $(LOCK)/dev.txt
	! grep -E -i '^(torch|triton|nvidia-|cuda-)' $(LOCK)/dev.txt  # no torch, no CUDA

serve: $(VENV)/.runtime  ## serve the bundled models on 127.0.0.1:8000
	$(VENV)/bin/nextword serve

test: lint  ## the checks of `make lint`, then the test suite
	$(PY) -m pytest -q

lint: $(VENV)/.dev  ## format, lint, types (every package), import layers, Dockerfiles, the documentation
	$(VENV)/bin/ruff format --check service model_export tests benchmarks docker docs
	$(VENV)/bin/ruff check service model_export tests benchmarks docker docs
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layering contracts in pyproject.toml
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.gpu
	d=$$(mktemp -d) && $(MKDOCS) build --strict --quiet --site-dir "$$d"; s=$$?; rm -rf "$$d"; exit $$s

# The documentation site (mkdocs.yml; material theme, offline: no web font, no CDN). The
# build fails on a broken link or a reference table that no longer matches the code:
# `python docs/reference.py --write` regenerates those (settings, metrics, errors, OpenAPI).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
docs: $(VENV)/.dev  ## build the documentation site into site/
	$(MKDOCS) build --strict

# Each benchmark is a module of the `benchmarks` package (run from the repository root).
bench: $(VENV)/.dev  ## engine, end-to-end, memory, store, limits and adaptation benchmarks
	$(PY) -m benchmarks.bench_engine --checkpoint runs/lstm runs/gru --int8
	$(PY) -m benchmarks.bench_e2e
	$(PY) -m benchmarks.bench_rest
	$(PY) -m benchmarks.bench_core --json benchmarks/results/core.json
	$(PY) -m benchmarks.bench_memory
	$(PY) -m benchmarks.bench_store
	$(PY) -m benchmarks.bench_long
	$(PY) -m benchmarks.bench_limits --json benchmarks/results/limits.json
	$(PY) -m benchmarks.bench_adapt --json benchmarks/results/adapt.json

baseline: $(VENV)/.dev  ## the count-based trigram baseline on the same split and metric
	NLTK_DATA=$(NLTK_DATA) $(PY) -m benchmarks.trigram_baseline --vocab service/models/lstm/vocab.txt --json benchmarks/results/trigram.json
	NLTK_DATA=$(NLTK_DATA) $(PY) -m benchmarks.trigram_baseline --vocab service/models/gru/vocab.txt --json benchmarks/results/trigram-gru.json

# How the bundled models were trained (see service/models/*/MODEL_CARD.md).
train-bundled: $(VENV)/.dev
	$(VENV)/bin/nextword train --corpora $(CORPORA) --nltk-data $(NLTK_DATA) --out runs/lstm \
	  --cell lstm --layers 2 --epochs 2 --max-steps 2500 --batch-size 64 --eval-interval 850 --checkpoint-interval 100 --threads 1
	$(VENV)/bin/nextword train --corpora $(CORPORA) --nltk-data $(NLTK_DATA) --out runs/gru \
	  --cell gru --layers 1 --hidden-size 512 --embedding-size 160 --vocab-size 20000 --fresh-rows 8 \
	  --epochs 3 --max-steps 3000 --batch-size 64 --eval-interval 500 --eval-text $(WIKITEXT) \
	  --eval-text-tokens 40000 --checkpoint-interval 100 --threads 1
	$(VENV)/bin/nextword export --checkpoint runs/lstm --out service/models/lstm --int8
	$(VENV)/bin/nextword export --checkpoint runs/gru --out service/models/gru --int8

# Held-out figures into each manifest; the float32 export of the same weights is
# recorded beside them (metrics_float32): the difference is what int8 costs.
evaluate-bundled: $(VENV)/.dev
	for m in lstm gru; do \
	  $(VENV)/bin/nextword evaluate --artifact service/models/$$m --text $(WIKITEXT) \
	    --corpora $(CORPORA) --nltk-data $(NLTK_DATA) --split test --record && \
	  $(VENV)/bin/nextword export --checkpoint runs/$$m --out runs/$$m-float32 --no-display-forms && \
	  $(VENV)/bin/nextword evaluate --artifact runs/$$m-float32 --text $(WIKITEXT) \
	    --corpora $(CORPORA) --nltk-data $(NLTK_DATA) --split test \
	    --record-in service/models/$$m --record-key metrics_float32 && \
	  $(PY) -m model_export.model_card service/models/$$m \
	    --baseline benchmarks/results/trigram$$([ $$m = gru ] && echo -gru).json > /dev/null || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache dist build site *.egg-info
