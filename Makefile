# kcl_ext: `make demo` runs the main job, `make test` runs the tests, `make bench` the CPU
# benchmarks. They set up everything they need on a fresh machine: the virtual environment
# (.venv, pinned requirements.txt) and the build; `make demo` also the Fashion-MNIST IDX files
# (`make data`).
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := build/.kcl_ext-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
CMAKE_BUILD := build-cmake
JOBS ?= 2

FMNIST_DIR := data/fashion-mnist
# The Debian package dataset-fashion-mnist (MIT licence) installs the IDX files here.
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
	t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
DEMO_OUT := runs/demo
CUDA_BUILD := build-cuda
CUDA_ARCHS ?= 8.0;9.0

.PHONY: venv build test test-python test-cmake data demo demo-loss clean build-cuda-check \
	cuda-resources bench

venv: $(STAMP)
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip==26.3 >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $@

build: $(BUILD_STAMP)
$(BUILD_STAMP): $(STAMP) $(SOURCES)
	MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | \
		sed -n '/kcl_ext build configuration/,/^=====/p;/error/Ip' ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import torch, kcl_ext; print('built', kcl_ext._library.LIBRARY_PATH)"
	mkdir -p build && touch $@

test: test-python test-cmake build-cuda-check

test-python: build
	$(PY) -m pytest -q tests

# The CMake build of the same library against libtorch, with its C++ test (ctest).
test-cmake: $(STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY)) \
		> $(CMAKE_BUILD).log 2>&1 || (cat $(CMAKE_BUILD).log; exit 1)
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

# --- CUDA build check (no GPU needed) ---------------------------------------------------------
# Compiles and links the CUDA kernels for $(CUDA_ARCHS) into $(CUDA_BUILD)/, away from the CPU
# build that the tests load; fails if a kernel spills registers to local memory (ptxas report),
# or if the library does not load and register CUDA kernels for every op.
build-cuda-check: $(CUDA_BUILD)/.checked
$(CUDA_BUILD)/.checked: $(STAMP) $(SOURCES) tools/cuda_resources.py tools/check_cuda_library.py
	rm -rf $(CUDA_BUILD) && mkdir -p $(CUDA_BUILD)
	@start=$$(date +%s); \
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" KCL_PTXAS_VERBOSE=1 MAX_JOBS=$(JOBS) \
		$(PY) setup.py build_ext --build-temp $(CUDA_BUILD)/temp --build-lib $(CUDA_BUILD)/lib \
		> $(CUDA_BUILD)/build.log 2>&1 || { tail -n 60 $(CUDA_BUILD)/build.log; exit 1; }; \
	echo "CUDA build ($(CUDA_ARCHS)) compiled and linked in $$(( $$(date +%s) - start )) s"
	sed -n '/kcl_ext build configuration/,/^=====/p' $(CUDA_BUILD)/build.log | tail -n +2
	$(PY) tools/cuda_resources.py $(CUDA_BUILD)/build.log --check
	KCL_EXT_LIBRARY="$$(ls $(CUDA_BUILD)/lib/kcl_ext/_C*.so)" PYTHONPATH=$(CURDIR) $(PY) tools/check_cuda_library.py
	touch $@

# Regenerates docs/cuda_resources.md from the check build's ptxas report.
cuda-resources: build-cuda-check
	$(PY) tools/cuda_resources.py $(CUDA_BUILD)/build.log --write docs/cuda_resources.md
# --- end CUDA build check ----------------------------------------------------------------------

data: $(addprefix $(FMNIST_DIR)/,$(FMNIST_FILES))
$(addprefix $(FMNIST_DIR)/,$(FMNIST_FILES)):
	@if [ ! -f $(FMNIST_SYSTEM)/$(@F) ]; then \
		echo "Installing the Debian package dataset-fashion-mnist (Fashion-MNIST IDX files)"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	mkdir -p $(FMNIST_DIR)
	cp $(FMNIST_SYSTEM)/$(@F) $@

# The main job: CE and KCL on Fashion-MNIST-LT through both stages, for each of DEMO_SEEDS, one
# table (per seed, and mean ± std), the per-class plots.
DEMO_SEEDS ?= 0 1 2
demo: build data
	@start=$$(date +%s); set -e; ce=; kcl=; \
	for seed in $(DEMO_SEEDS); do \
		$(PY) -m kcl_ext.train --config configs/fmnist_lt_ce.yaml --out $(DEMO_OUT)/ce-seed$$seed \
			--set seed=$$seed; \
		$(PY) -m kcl_ext.train --config configs/fmnist_lt_kcl.yaml --out $(DEMO_OUT)/kcl-seed$$seed \
			--set seed=$$seed; \
		ce=$${ce:+$$ce,}$(DEMO_OUT)/ce-seed$$seed/report.json; \
		kcl=$${kcl:+$$kcl,}$(DEMO_OUT)/kcl-seed$$seed/report.json; \
	done; \
	$(PY) -m kcl_ext.compare "CE=$$ce" "KCL=$$kcl" --markdown $(DEMO_OUT)/table.md; \
	echo "plots: $(DEMO_OUT)/*/per_class.png; table: $(DEMO_OUT)/table.md"; \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

# The loss alone: the fused CPU op beside the dense reference at MoCo sizes.
demo-loss: build
	$(PY) -m benchmarks.demo_loss --q 4096 16384 65536

# The CPU benchmark suite (docs/benchmarks.md): JSON in benchmarks/results/, then the README's
# benchmark section and the plots rendered from it.
bench: build
	$(PY) -m benchmarks.run --device cpu --out benchmarks/results
	$(PY) -m benchmarks.render

clean:
	rm -rf build $(CMAKE_BUILD) $(CMAKE_BUILD).log $(CUDA_BUILD) *.egg-info kcl_ext/_C*.so
