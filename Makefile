.PHONY: setup demo test test-fast lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/tunestack run examples/demo/recipe.yaml

# The light tests run in two workers (each on one thread); the slow and distributed ones then run alone, since two
# torch processes sharing two cores slow each other down.
test: setup
	.venv/bin/python -m pytest -q -n 2 -m "not slow and not distributed"
	.venv/bin/python -m pytest -q -m "slow or distributed" --durations=10

test-fast: setup
	.venv/bin/python -m pytest -q -n 2 -m "not slow and not distributed"

lint: setup
	.venv/bin/ruff check src tests bench
