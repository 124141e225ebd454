# The two commands of README.md: `make quickstart` and `make test`.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-py312 bench clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/illada quickstart

test: $(STAMP)
	$(VENV)/bin/pytest

# The other supported Python: a non-editable install of the data stack (no torch: PyPI has
# only its CUDA build, several GB) and the tests that need nothing more, the wheel's
# quickstart up to training and an install beside another torch among them. The full suite
# runs on the Python of `make test`.
PY312_TESTS := tests/test_config.py tests/test_cli.py tests/test_imports.py tests/data/test_ingest.py tests/data/test_dedup_exact.py tests/test_packaging.py
test-py312:
	scripts/python312-check.sh $(PY312_TESTS)

clean:
	rm -rf runs .pytest_cache .venv312
