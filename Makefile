# referral-service: the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf
STAMP  := $(VENV)/.installed

PROTO_FILES := $(wildcard protos/referral/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help install run test test-sqlite generate check-generated lint buf-lint fmt migrate clean fuzz soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP) ## create the virtualenv and install the project with its dev tools

run: $(STAMP) ## migrate the database and serve gRPC on 127.0.0.1:50051 (SQLite under ./data/)
	$(VENV)/bin/referral-service migrate
	$(VENV)/bin/referral-service serve

test: $(STAMP) ## run the whole test suite (SQLite always; PostgreSQL and Redis when reachable)
	$(PY) -m pytest $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP) ## long fuzz run: FUZZ_EXAMPLES (1000) random examples per RPC, new ones each run
	REFERRAL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) REFERRAL_FUZZ_RANDOM=1 $(PY) -m pytest tests/test_fuzz.py -q $(PYTEST_ARGS)

SOAK_SECONDS ?= 120
soak: $(STAMP) ## mixed load for SOAK_SECONDS (120) with Redis and PostgreSQL restarted once each
	$(PY) -m tests.soak --seconds $(SOAK_SECONDS)

migrate: $(STAMP) ## apply migrations to REFERRAL_DATABASE_URL (default ./data/referral.db)
	$(VENV)/bin/referral-service migrate

generate: $(STAMP) ## regenerate Python stubs and type stubs into generated/
	rm -rf generated/referral
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos -Iprotos/third_party \
		--python_out=generated --mypy_out=generated \
		--grpc_python_out=generated --mypy_grpc_out=generated \
		$(PROTO_FILES)
	touch generated/referral/__init__.py generated/referral/v1/__init__.py

check-generated: generate ## fail when generated/ is not what `make generate` produces
	git diff --exit-code --stat -- generated/
	@test -z "$$(git status --porcelain -- generated/)" || (git status --porcelain -- generated/; echo "generated/ is stale: run make generate"; exit 1)

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

buf-lint: $(BUF) ## buf lint (STANDARD rules)
	cd protos && ../$(BUF) lint

lint: $(STAMP) buf-lint ## ruff, mypy and buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove the virtualenv, caches and the local database
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data node_modules
