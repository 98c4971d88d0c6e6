# The two commands of README: `make demo` (the main job) and `make test`. Each builds .venv if needed.
PY := .venv/bin/python

.PHONY: venv test test-core demo bench bench-wide bench-quick bench-profile bench-pairs bench-gpu lint clean

venv:
	@bash dev/setup_venv.sh

test: venv
	$(PY) -m pytest -q --durations=15 tests

test-core: venv
	$(PY) -m pytest -q tests/core

demo: venv
	$(PY) -u -m dev.demo

bench: venv
	$(PY) -m bench.run

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf .venv .cache demo_output

bench-quick: venv
	$(PY) -m bench.run --quick

bench-profile: venv
	$(PY) -m bench.profile

bench-pairs: venv
	$(PY) -m bench.pairs

bench-wide: venv
	$(PY) -m bench.wide

bench-gpu: venv
	$(PY) -m bench.gpu
