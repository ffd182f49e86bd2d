# Set-up and the two jobs. `make reproduce` is the main job; `make test` runs the tests.
PY ?= python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NUMBA_CACHE_DIR ?= /tmp/lab-numba-cache

.PHONY: install reproduce test test-slow bench app docs notebooks

install:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(PY) -m pip install -e '.[test]'

reproduce: install
	lab reproduce --preset quick

# notebook cells that train (the RLF baselines on smoke) took > 300 s, nbmake's default timeout, on a loaded 2-core machine
test: install-quiet
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests
	LAB_PRESET=smoke LAB_HOME=$$(mktemp -d) $(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1200 notebooks

test-slow: install-quiet
	$(PY) -m pytest -q -m slow tests

bench: install-quiet
	$(PY) bench/run.py

app: install-quiet
	lab app

# every notebook executed on the quick preset and stored with its outputs (figures also as PNG, for code hosts)
notebooks: install-quiet
	LAB_PRESET=quick LAB_NOTEBOOK_IMAGES=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=3600 notebooks/*.ipynb

# the README's results table and pictures, from the main job's report
docs: install-quiet
	lab docs --run quick-seed0

install-quiet:
	@$(PY) -c "import lab, playwright, nbmake, ruff" 2>/dev/null || $(MAKE) install
