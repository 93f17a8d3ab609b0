# llmlab: two commands do everything.
#   make lab    set up .venv and open the notebooks in JupyterLab
#               (more JupyterLab options: make lab LAB_ARGS="--port 8890 --no-browser")
#   make test   set up .venv and run lint, unit tests and strict nbval on every notebook
# Also: make test-colab (the collection as Colab runs it; downloads several GB the first time).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Notebooks run with 2 pytest workers, one notebook per worker at a time.
WORKERS ?= 2
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads slow
# the other pytest worker and the notebook kernels several times over.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: lab test test-colab install lint unit nbval notebooks check-notebooks bench clean site flashcards test-site

# JupyterLab settings for this project's environment (no news pop-up): copied into the venv.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json

install: $(STAMP) $(LAB_SETTINGS)

# Re-install only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

$(LAB_SETTINGS): jupyter/overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp jupyter/overrides.json $@

# Containers often run as root, which JupyterLab refuses unless told otherwise. LAB_ARGS is added
# after these defaults, so extra options never drop them.
LAB_DEFAULTS := --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_ARGS ?=

lab: install
	$(BIN)/jupyter lab $(LAB_DEFAULTS) $(LAB_ARGS)

lint: install
	$(BIN)/ruff check llmlab tests notebooks scripts benchmarks
	$(BIN)/python scripts/nbtools.py check

# Unit tests, the package's docstring examples, notebook structure tests and strict nbval over
# every notebook, in one pytest run so that it ends with a single summary line; per-notebook wall
# times are printed above it.
test: lint
	$(BIN)/python -m pytest tests llmlab notebooks --doctest-modules -n $(WORKERS) --dist loadfile \
	    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
	    --nbval-cell-timeout 300 --durations 10

unit: install
	$(BIN)/python -m pytest tests llmlab --doctest-modules -n $(WORKERS)

nbval: install
	$(BIN)/python -m pytest notebooks -n $(WORKERS) --dist loadfile \
	    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

# Re-execute every notebook in place (fresh kernel, top to bottom) to refresh stored outputs.
# One notebook: make notebooks NB=notebooks/03_positional_encodings.ipynb
NB ?= notebooks/*.ipynb
notebooks: install
	$(BIN)/python scripts/nbtools.py execute $(NB)

# The collection as Colab runs it (its torch, transformers and peft; the wheel installed; notebooks
# outside the repository). Not part of `make test`. See scripts/test_colab.sh.
test-colab: install
	bash scripts/test_colab.sh

# Study tools (README, "Study tools"): the static site with search, the Anki deck, their browser and
# read-back tests (these also run inside `make test`).
site: install
	$(BIN)/python scripts/build_site.py

flashcards: install
	$(BIN)/python scripts/build_flashcards.py

test-site: install
	$(BIN)/python -m pytest tests/test_site.py tests/test_flashcards.py -q -p no:xdist

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
