# The two commands of README.md: `make quickstart` and `make test`.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test bench clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/illada quickstart

test: $(STAMP)
	$(VENV)/bin/pytest

clean:
	rm -rf runs .pytest_cache
