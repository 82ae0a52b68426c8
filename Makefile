# Two entry points that set up a fresh machine by themselves: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install browser run test test-fast bench screenshot clean

install: $(STAMP)

# The pinned dependencies, then the package itself, editable (pyproject.toml; its own dependencies are
# those pins already, so nothing else is resolved).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --config-settings editable_mode=compat -e .
	touch $(STAMP)

# The browser test drives Debian's Chromium (never a downloaded one). Installed when missing and
# this user can; otherwise the browser test fails and says how to install it.
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; else sudo=none; fi; \
		if [ "$$sudo" = none ] || ! command -v apt-get >/dev/null; then \
			echo "warning: $(CHROMIUM) is missing and cannot be installed here; the browser test will fail"; \
		else \
			echo "installing Debian's chromium for the browser test"; \
			$$sudo apt-get update -qq || true; \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
				|| echo "warning: could not install chromium; the browser test will fail"; \
		fi; \
	fi

run: $(STAMP)
	$(PY) app.py

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The unit tier alone: in-process tests of a few seconds at most (no server, no browser, no long runs).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m unit

bench: $(STAMP)
	$(PY) benchmarks/tome_speed.py

# Re-make the README's screenshots (desktop and phone widths) with the browser test.
screenshot: $(STAMP) browser
	HF_HUB_OFFLINE=1 VDTOME_SCREENSHOTS=assets $(PY) -m pytest -q tests/test_app_browser.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
