# kcl_ext: `make demo` runs the main job (the paired loss study; `make demo-quick` a smoke
# run), `make test` runs the tests, `make bench` the CPU benchmarks. They set up everything they need on a fresh machine: the virtual environment
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
RECIPE := references/kcl
STUDY := experiments/fmnist_lt_study
DEMO_OUT := runs/demo
CUDA_BUILD := build-cuda
CUDA_ARCHS ?= 8.0;9.0

.PHONY: venv build test test-python test-cmake data demo demo-quick demo-loss clean build-cuda-check \
	cuda-resources bench bench-publish test-oldest gpu-wheels

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

test: test-python test-cmake build-cuda-check test-oldest

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

# --- The oldest supported stack (requirements-oldest.txt: torch 2.11, triton 3.6, setuptools 64) ---
# Its own venv; the wheel is built with pip from a copy of the working tree (tracked and untracked,
# not ignored files) so that nothing of the main build is reused, and installed into that venv. The
# tests run from $(OLDEST)/ so that `import kcl_ext` finds the installed wheel, not the source tree:
# the CPU contract tests, the Triton interpreter tests, then the compile check of every Triton kernel
# for sm_90a (compile errors and register spills fail it).
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST := build-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.requirements-installed
$(OLDEST_STAMP): requirements-oldest.txt
	test -x $(OLDEST_PY) || $(PYTHON_SYS) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --upgrade pip==26.3 >/dev/null
	$(OLDEST_PY) -m pip install -q -r requirements-oldest.txt
	touch $@

$(OLDEST)/.installed: $(OLDEST_STAMP) $(SOURCES) $(shell find kcl_ext -name '*.py')
	rm -rf $(OLDEST) && mkdir -p $(OLDEST)/src $(OLDEST)/wheel
	git ls-files -co --exclude-standard | tar -T - -cf - | tar -xf - -C $(OLDEST)/src
	@start=$$(date +%s); \
	MAX_JOBS=$(JOBS) $(OLDEST_PY) -m pip wheel --no-build-isolation --no-deps -w $(OLDEST)/wheel \
		$(OLDEST)/src > $(OLDEST)/build.log 2>&1 || { tail -n 40 $(OLDEST)/build.log; exit 1; }; \
	echo "oldest stack: wheel built in $$(( $$(date +%s) - start )) s"
	$(OLDEST_PY) -m pip install -q --force-reinstall --no-deps $(OLDEST)/wheel/*.whl
	cd $(OLDEST) && ../$(OLDEST_PY) -c "import sys, setuptools, torch, triton, kcl_ext; \
		assert kcl_ext.__file__.startswith(sys.prefix), kcl_ext.__file__; \
		print('oldest stack: torch', torch.__version__, 'triton', triton.__version__, \
		      'setuptools', setuptools.__version__, 'kcl_ext from', kcl_ext.__file__)"
	touch $@

test-oldest: $(OLDEST)/.installed
	cd $(OLDEST) && ../$(OLDEST_PY) -m pytest -q -p no:cacheprovider ../tests/test_contract.py \
		../tests/test_cpu.py ../tests/test_triton.py
	cd $(OLDEST) && ../$(OLDEST_PY) ../tools/triton_compile_check.py --arch 90a --check-spills
# --- end oldest stack -------------------------------------------------------------------------

# The Fashion-MNIST IDX files in $(FMNIST_DIR), checked (sizes and MD5 of their content): copied
# from /usr/share/datasets/fashion-mnist where the Debian package dataset-fashion-mnist put them
# (apt-get install dataset-fashion-mnist, as root), else downloaded by torchvision (a network);
# references/kcl/get_data.py says what to do when neither works.
data: $(FMNIST_DIR)/.checked
$(FMNIST_DIR)/.checked: $(STAMP)
	$(PY) $(RECIPE)/get_data.py --out $(FMNIST_DIR)
	touch $@

# The main job: the paired CE / FCL / KCL study on Fashion-MNIST-LT ($(STUDY)/study.yaml,
# docs/training.md "The study"): the balanced-CE difficulty control, four class orderings built
# from it, two seeds each, the three losses through both stages, the beta protocol on a
# balanced held-out split, paired 95 % intervals, the positive control; one verdict table,
# runs/demo/study.json, verdict.md and the plots. It replaces the previous study in runs/demo.
# The committed results are in $(STUDY)/results/.
DEMO_JOBS ?= 2
# OpenMP threads that sleep instead of spinning when they wait: on a CPU shared with other jobs
# spinning slows torch and the fused op several-fold (see the README); results do not change.
demo: export OMP_WAIT_POLICY ?= passive
demo: build data
	@start=$$(date +%s); \
	$(PY) $(STUDY)/study.py --config $(STUDY)/study.yaml --out $(DEMO_OUT) \
		--overwrite --jobs $(DEMO_JOBS) && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

# A quick smoke run of the recipe: CE and KCL on the one class order of Fashion-MNIST-LT
# (class c gets the c-th largest size), both stages, for each of DEMO_SEEDS; one table.
# Each run replaces the previous one in its folder (--overwrite).
DEMO_SEEDS ?= 0
DEMO_QUICK_OUT := runs/demo-quick
demo-quick: export OMP_WAIT_POLICY ?= passive
demo-quick: build data
	@start=$$(date +%s); set -e; ce=; kcl=; \
	for seed in $(DEMO_SEEDS); do \
		$(PY) $(RECIPE)/train.py --config configs/fmnist_lt_ce.yaml --out $(DEMO_QUICK_OUT)/ce-seed$$seed \
			--overwrite --set seed=$$seed; \
		$(PY) $(RECIPE)/train.py --config configs/fmnist_lt_kcl.yaml --out $(DEMO_QUICK_OUT)/kcl-seed$$seed \
			--overwrite --set seed=$$seed; \
		ce=$${ce:+$$ce,}$(DEMO_QUICK_OUT)/ce-seed$$seed/report.json; \
		kcl=$${kcl:+$$kcl,}$(DEMO_QUICK_OUT)/kcl-seed$$seed/report.json; \
	done; \
	$(PY) $(RECIPE)/compare.py "CE=$$ce" "KCL=$$kcl" --markdown $(DEMO_QUICK_OUT)/table.md; \
	echo "plots: $(DEMO_QUICK_OUT)/*/per_class.png; table: $(DEMO_QUICK_OUT)/table.md"; \
	echo "demo-quick wall time: $$(( $$(date +%s) - start )) s"

# The loss alone: the fused CPU op beside the dense reference at MoCo sizes.
demo-loss: build
	$(PY) -m benchmarks.demo_loss --q 4096 16384 65536

# The CPU benchmark suite (docs/benchmarks.md): pytest-benchmark's JSON into $(BENCH_OUT) (ignored);
# tracked files stay as they are. `make bench-publish` turns that run into the committed flat table
# benchmarks/results/cpu.csv and its metadata cpu.meta.json, then renders the README's benchmark
# section and the plots from benchmarks/results/.
BENCH_OUT ?= runs/bench
BENCH_NOTE ?=
bench: export OMP_WAIT_POLICY ?= passive
bench: build
	$(PY) -m benchmarks.run --device cpu --out $(BENCH_OUT)

bench-publish: $(STAMP)
	$(PY) -m benchmarks.publish $(BENCH_OUT)/cpu.json $(if $(BENCH_NOTE),--note "$(BENCH_NOTE)")

# Wheels for Python 3.12 of what the GPU machine's image lacks (tools/gpu_check.sh): expecttest
# (torch.library.opcheck imports it) and the benchmark's peers. All four are pure Python and need
# nothing the image lacks. They go to the ignored .whl/ folder, which the device command carries;
# the script installs them offline (docs/benchmarks.md, "The GPU check").
GPU_WHEELS := expecttest==0.3.0 inf-cl==1.2.1 pytorch-metric-learning==2.9.0 cut-cross-entropy==25.1.1
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	ls .whl

clean:
	rm -rf build $(CMAKE_BUILD) $(CMAKE_BUILD).log $(CUDA_BUILD) $(OLDEST) *.egg-info kcl_ext/_C*.so
