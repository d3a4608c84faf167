# referral-service: the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf
STAMP  := $(VENV)/.installed

PROTO_FILES := $(wildcard protos/referral/v1/*.proto)
# One exception class per ErrorReason for the Python client, generated from errors.proto.
CLIENT_REASONS := clients/python/src/referral_client/_reasons.py

.DEFAULT_GOAL := help
.PHONY: help install run test generate docs check-generated lint buf-lint buf-breaking fmt migrate clean bench bench-charts bench-events bench-full common-passwords fuzz soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The server depends on the Python client distribution (clients/python: the stubs in generated/
# and the client layer); the second step makes it editable, so generated/ is what gets imported.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -e ./clients/python
	touch $@

install: $(STAMP) ## create the virtualenv and install the project with its dev tools

run: $(STAMP) ## migrate the database; serve gRPC on 127.0.0.1:50051 and HTTP/JSON on 127.0.0.1:8080
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

# The descriptor set keeps the proto comments (source info), which _pb2 modules do not carry:
# the gateway reads it for the OpenAPI document, and `make docs` for docs/api.md.
generate: $(STAMP) ## regenerate Python stubs, type stubs and the descriptor set into generated/, the client's error classes
	rm -rf generated/referral
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos -Iprotos/third_party \
		--python_out=generated --mypy_out=generated \
		--grpc_python_out=generated --mypy_grpc_out=generated \
		--include_source_info --descriptor_set_out=generated/referral/v1/api_descriptor.binpb \
		$(PROTO_FILES)
	touch generated/referral/__init__.py generated/referral/v1/__init__.py generated/referral/py.typed
	$(PY) tools/client_errors.py > $(CLIENT_REASONS).tmp && mv $(CLIENT_REASONS).tmp $(CLIENT_REASONS)

common-passwords: $(STAMP) ## re-extract data/common-passwords.txt from zxcvbn's list
	$(PY) -c 'import importlib.metadata as md; from zxcvbn.frequency_lists import FREQUENCY_LISTS as F; \
	words = sorted({p.lower() for p in F["passwords"]}); \
	print("# The 30,000 most common passwords, lower-cased, from zxcvbn", md.version("zxcvbn"), "(FREQUENCY_LISTS[\x27passwords\x27]).\n# Regenerate with `make common-passwords`."); \
	print("\n".join(words))' > referral_service/data/common-passwords.txt

docs: $(STAMP) ## regenerate the Markdown API reference docs/api.md from the protos
	@mkdir -p docs
	$(PY) tools/api_markdown.py > docs/api.md.tmp && mv docs/api.md.tmp docs/api.md

check-generated: generate docs ## fail when generated/, the client's error classes or docs/api.md differ from `make generate docs`
	git diff --exit-code --stat -- generated/ docs/ $(CLIENT_REASONS)
	@test -z "$$(git status --porcelain -- generated/ docs/ $(CLIENT_REASONS))" || (git status --porcelain -- generated/ docs/ $(CLIENT_REASONS); echo "generated/ or docs/ is stale: run make generate docs"; exit 1)

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

buf-lint: $(BUF) ## buf lint (STANDARD rules; the workspace is buf.yaml at the root)
	$(BUF) lint

# Against main's protos (or, on main itself, the previous commit's): v1 is public.
BREAKING_BASE ?= $(shell git rev-parse -q --verify refs/heads/main >/dev/null && test "$$(git rev-parse HEAD)" != "$$(git rev-parse refs/heads/main)" && echo main || (git rev-parse -q --verify refs/remotes/origin/main >/dev/null && test "$$(git rev-parse HEAD)" != "$$(git rev-parse refs/remotes/origin/main)" && echo origin/main) || echo HEAD~1)
# A base from before the workspace moved to the root keeps its buf.yaml in protos/.
buf-breaking: $(BUF) ## buf breaking against main (BREAKING_BASE=<git rev> to choose)
	@rm -rf .breaking-base && mkdir -p .breaking-base
	@if git rev-parse -q --verify "$(BREAKING_BASE)^{commit}" >/dev/null; then \
		if git cat-file -e "$(BREAKING_BASE):buf.yaml" 2>/dev/null; then paths="buf.yaml protos"; against=.breaking-base; \
		else paths=protos; against=.breaking-base/protos; fi; \
		git archive "$(BREAKING_BASE)" $$paths | tar -x -C .breaking-base && \
		echo "buf breaking against $(BREAKING_BASE) ($$(git rev-parse --short $(BREAKING_BASE)))" && \
		$(BUF) breaking --against $$against; status=$$?; rm -rf .breaking-base; exit $$status; \
	else echo "buf breaking: no $(BREAKING_BASE) to compare with, skipped"; fi

lint: $(STAMP) buf-lint ## ruff, mypy, the architecture contracts (import-linter) and buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove the virtualenv, caches and the local database
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data node_modules .breaking-base

bench: $(STAMP) ## benchmark against a bare grpc.aio echo server (short mode, < 2 min; needs h2load)
	@command -v h2load >/dev/null || (echo "h2load is missing: apt-get install nghttp2-client"; exit 1)
	$(PY) -m bench.run

bench-events: $(STAMP) ## WatchEvents commit-to-watcher latency, 100 watchers, PostgreSQL, two workers
	$(PY) -m bench.events

bench-charts: $(STAMP) ## redraw bench/results/charts/ from the run files in bench/results/runs/
	$(PY) -m bench.charts

bench-full: $(STAMP) ## the full benchmark (1,000,000 referrals, longer runs)
	@command -v h2load >/dev/null || (echo "h2load is missing: apt-get install nghttp2-client"; exit 1)
	$(PY) -m bench.run --full
