# Every target installs what is missing first (scripts/setup.sh is idempotent).
SHELL := /bin/bash
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo demo-scene lint bench

setup:
	@scripts/setup.sh

test:
	@V=$$(scripts/setup.sh | tail -n 1) && $$V/bin/python -m pytest -q $(PYTEST_ARGS)

test-slow:
	@V=$$(scripts/setup.sh | tail -n 1) && $$V/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

demo:
	@V=$$(scripts/setup.sh | tail -n 1) && PATH=$$V/bin:$$PATH bash scripts/demo.sh && echo "Explore it in the browser: $$V/bin/cryoem explore $$(realpath $${OUT:-runs/demo}/run)   (then open http://127.0.0.1:8050/; from another machine: ssh -L 8050:127.0.0.1:8050 user@host)"

demo-scene:
	@V=$$(scripts/setup.sh | tail -n 1) && PATH=$$V/bin:$$PATH bash scripts/demo_scene.sh

lint:
	@V=$$(scripts/setup.sh | tail -n 1) && $$V/bin/ruff check .

bench:
	@V=$$(scripts/setup.sh | tail -n 1) && $$V/bin/python -m renderers.bench
