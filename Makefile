# The two commands of the README: `make demo` and `make test`.
# Each creates its own virtual environment and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-ocr lint test models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m demo

# The pretrained OCR models (bench/ocr.py): pip downloads rapidocr-onnxruntime's wheel
# from PyPI (no dependencies, sha256 pinned) and only its three ONNX files are kept.
# Tests and demos read them from here and never download.
MODELS := .cache/models
OCR_MODELS := $(MODELS)/rapidocr-1.4.4/ch_PP-OCRv4_rec_infer.onnx
$(OCR_MODELS): | $(VENV)/.installed
	$(PY) -m bench.ocr fetch $(MODELS)
models: $(OCR_MODELS)

# The second demo: PP-OCR's real text-direction classifier, its frontier per hardware class and a
# rollout with an accuracy floor (demo/ocr.py; tests/test_ocr_e2e.py runs the same steps).
demo-ocr: $(VENV)/.installed models
	$(PY) -m demo.ocr

# Static checks, configured in pyproject.toml. `edgefleet.agent` is the folder
# agent/ (setuptools package-dir), which mypy cannot see through the editable
# install, so .cache/mypy/edgefleet/ links each folder under its installed name;
# mypy's paths are printed back as the repository's own.
EDGEFLEET_DIRS := common agent controller migrations manifests simulator
lint: $(VENV)/.installed
	@rm -rf .cache/mypy/edgefleet && mkdir -p .cache/mypy/edgefleet
	@for d in $(EDGEFLEET_DIRS); do ln -s ../../../$$d .cache/mypy/edgefleet/$$d; done
	@rc=0; echo "ruff check ."; $(PY) -m ruff check . || rc=1; \
	echo "mypy"; $(PY) -m mypy > .cache/mypy/out.txt || rc=1; \
	sed 's|^\.cache/mypy/edgefleet/||' .cache/mypy/out.txt; exit $$rc

# pytest exits 5 when it collected no test: that must not pass as green.
test: lint models
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
