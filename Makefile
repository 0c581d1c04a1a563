# The two commands: `make train` (main job on the bundled digits data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-fast mutation venv clean

venv: $(STAMP)

# Recreate the environment whenever the pins change.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

# Three workers on two cores: many tests wait on torchrun processes, timeouts and start-up; work stealing
# keeps both cores busy to the end (measured: 580 s with -n 2, 482 s with -n 3 --dist worksteal).
# --durations: CI's log names the slowest tests, where its time goes.
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist worksteal --durations=30 $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 3 --dist worksteal -m "not slow" $(ARGS)

# Named semantic mutations, one at a time on a copy of the repository: the tests named for each must fail
# (ARGS="--list", "--only NAME[,NAME]", "--check-apply", "--json PATH", "-j 2"; --check-apply takes 4 min, all 15).
mutation: $(STAMP)
	$(PY) scripts/mutation_check.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
