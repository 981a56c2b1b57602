# kcl_ext: `make demo` runs the main job, `make test` runs the tests, `make bench` the CPU
# benchmarks. They set up everything they need on a fresh machine: the virtual environment
# (.venv, pinned requirements.txt) and the build.
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := build/.kcl_ext-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
CMAKE_BUILD := build-cmake
JOBS ?= 2

.PHONY: venv build test test-python test-cmake demo bench clean

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

test: test-python test-cmake

test-python: build
	$(PY) -m pytest -q tests

# The CMake build of the same library against libtorch, with its C++ test (ctest).
test-cmake: $(STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE=$(PY) > $(CMAKE_BUILD).log 2>&1 || (cat $(CMAKE_BUILD).log; exit 1)
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

demo: build
	$(PY) -m benchmarks.demo_loss --q 4096 16384 65536

# The CPU benchmark suite (docs/benchmarks.md): JSON in benchmarks/results/, then the README's
# benchmark section and the plots rendered from it.
bench: build
	$(PY) -m benchmarks.run --device cpu --out benchmarks/results
	$(PY) -m benchmarks.render

clean:
	rm -rf build $(CMAKE_BUILD) $(CMAKE_BUILD).log *.egg-info kcl_ext/_C*.so
