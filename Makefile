# EditScope: two commands do everything on a fresh machine.
#   make run   install what is needed, build the demo model (first time only), start the app
#   make test  install what is needed and run the whole test suite
PYTHON ?= python3
PORT ?= 8501

.PHONY: run test deps browser lint bench

deps:
	$(PYTHON) -m pip install -q -r requirements.txt

# Debian's Chromium for the real-browser tests (Playwright cannot download browsers here).
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| echo "warning: could not install chromium; browser tests will be skipped"; \
	fi

run: deps
	$(PYTHON) -m editing.demo
	$(PYTHON) -m streamlit run app.py --server.port $(PORT) --server.headless true

test: deps browser
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

bench: deps
	$(PYTHON) -m eval.bench
