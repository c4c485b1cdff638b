# eph: `make loadtest` and `make test` are the two commands a new machine needs.
# Both create .venv and install eph into it on first use (`make setup`).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WORKERS ?= 3
STAMP  := $(VENV)/.installed

# make loadtest [TARGET=host:port] [SCENARIO=name|path] [USERS=n] [RATE=n] [DURATION=30s] [ARGS=...]
TARGET   ?=
SCENARIO ?=
USERS    ?=
RATE     ?=
DURATION ?=
ARGS     ?=

scenario_path = $(if $(wildcard $(1)),$(1),scenarios/$(1).toml)
ifeq ($(strip $(TARGET)),)
LOADTEST_SCENARIO := $(call scenario_path,$(or $(SCENARIO),default))
LOADTEST_FLAGS    :=
else
# port 443 speaks HTTPS (staging-https.toml); any other port churns raw TCP (staging.toml)
LOADTEST_SCENARIO := $(call scenario_path,$(or $(SCENARIO),$(if $(filter %:443,$(TARGET)),staging-https,staging)))
LOADTEST_FLAGS    := --target $(TARGET)
endif
LOADTEST_FLAGS += $(if $(USERS),--set load.users=$(USERS)) $(if $(RATE),--set load.rate=$(RATE)) \
                  $(if $(DURATION),--set duration=$(DURATION))

.DEFAULT_GOAL := help
.PHONY: help setup system-deps recorder test check lint typecheck pytest docs loadtest bench soak clean

help: ## Show this help
	@echo "eph: ephemeral-port exhaustion harness"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo
	@echo "  make loadtest TARGET=staging:443 USERS=100 RATE=500 DURATION=60s"
	@echo "  make test ARGS='-k listener'"

# uv resolves and installs the same versions as pip in a quarter of the time (14 s
# against 60 s from a fresh clone here); pip does it alone when uv cannot be had.
# Both compile the bytecode now, and harness/ too: where PYTHONDONTWRITEBYTECODE is
# set (as in this machine's environment) nothing else writes it, and every process of every
# run compiled what it imported: 1.9 s of CPU to start a Locust process, 0.9 s with it
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv \
	  && $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' \
	  || $(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 harness >/dev/null
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install eph with its dev tools (idempotent)

# the kernel recorder's eBPF program (harness/kernel/connections.bpf.c), loaded by eph
# itself; where clang or libbpf's headers are missing, eph records with bpftrace, whose
# tracepoint program the kernel skips now and then under load (docs/kernel.md)
RECORDER := harness/kernel/connections.bpf.o
recorder: ## Build the kernel recorder's eBPF program (clang, libbpf-dev); without them eph uses bpftrace
	@if { command -v clang-14 || command -v clang; } >/dev/null && [ -e /usr/include/bpf/bpf_helpers.h ]; then \
	  $(MAKE) --no-print-directory $(RECORDER); \
	else echo "recorder: no clang or libbpf-dev here: eph traces with bpftrace"; fi

$(RECORDER): harness/kernel/connections.bpf.c
	$$(command -v clang-14 || command -v clang) -O2 -g -Wall -Werror -target bpf \
	  -I/usr/include/$$(uname -m)-linux-gnu -c $< -o $@

# Debian tools the tests and benches use: ip/ss (iproute2), a headless browser for
# report.html and Locust's web UI, clients and servers eph did not write (nginx, curl,
# and ab, wrk and hey, the peers `make bench` measures eph against), clang and libbpf's
# headers to build the kernel's record of every connection (eph observe --trace), and
# bpftrace, its fallback and the tests' own probes
# and promtool, which lints what eph observe --prometheus serves and tests the alert rules
system-deps: ## Install iproute2, nftables, conntrack, chromium, nginx, curl, ab, wrk, hey, clang, libbpf-dev, bpftrace and prometheus (for promtool) with apt-get when missing (root; no service is started)
	@missing=""; \
	command -v ip >/dev/null && command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v conntrack >/dev/null || missing="$$missing conntrack"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v hey >/dev/null || missing="$$missing hey"; \
	command -v bpftrace >/dev/null || missing="$$missing bpftrace"; \
	{ command -v clang-14 || command -v clang; } >/dev/null || missing="$$missing clang"; \
	[ -e /usr/include/bpf/bpf_helpers.h ] || missing="$$missing libbpf-dev"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    blocker=/usr/sbin/policy-rc.d; made=""; \
	    if [ ! -e $$blocker ]; then printf '#!/bin/sh\nexit 101\n' > $$blocker && chmod +x $$blocker && made=1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    status=$$?; [ -z "$$made" ] || rm -f $$blocker; [ $$status = 0 ] || exit $$status; \
	  else \
	    echo "missing:$$missing (install them, or run make as root on Debian)"; exit 1; \
	  fi; \
	fi

lint: setup ## ruff on the code, and the import rules between packages (pyproject.toml)
	$(BIN)/ruff check harness tests bench
	$(BIN)/lint-imports --no-cache

typecheck: setup ## mypy --strict on harness/
	$(BIN)/mypy harness

# the isolated tests side by side (each lab's namespaces carry its pid); then those
# marked paced (a modest paced rate against a model) two at a time; then those marked
# serial (CPU, timing, the fastest rate; stale namespaces) alone. All three always run.
pytest: setup recorder ## Only the test suite (ARGS= passes pytest flags, WORKERS= the side-by-side processes)
	@status=0; \
	$(BIN)/pytest -n $(WORKERS) --dist worksteal -m "not serial and not paced" $(ARGS) || [ $$? -eq 5 ] || status=1; \
	$(BIN)/pytest -n 2 --dist worksteal -m paced $(ARGS) || [ $$? -eq 5 ] || status=1; \
	$(BIN)/pytest -m serial $(ARGS) || [ $$? -eq 5 ] || status=1; \
	exit $$status

test: export EPH_REQUIRE_BROWSER = 1
test: export EPH_REQUIRE_TOOLS = 1
# mypy (13 s from a fresh clone) runs beside the suite's first phase; its verdict counts
test: system-deps lint ## Lint, type-check and run the whole test suite
	@types=$$(mktemp); $(BIN)/mypy harness > $$types 2>&1 & mypy=$$!; \
	$(MAKE) --no-print-directory pytest; status=$$?; \
	wait $$mypy || status=1; echo "mypy harness:"; cat $$types; rm -f $$types; \
	exit $$status

# the edit loop: no namespace, no subprocess of eph, no server or browser
check: lint typecheck ## Fast tier: lint, types, and every test that needs no namespace, server or browser
	$(BIN)/pytest -m "not netns and not e2e and not docs" $(ARGS)

docs: setup ## Build the manual (docs/) into build/site with mkdocs --strict
	$(BIN)/mkdocs build --strict --site-dir build/site

loadtest: setup recorder ## Default scenario in a lab (or on loopback), or TARGET=host:port with staging.toml
ifeq ($(strip $(TARGET)),)
	@if $(BIN)/python -c 'import sys; from harness.kernel.netns import netns_available as n; sys.exit(bool(n()))'; then \
	  echo "network namespaces available: running $(LOADTEST_SCENARIO) in a lab (its [kernel] settings apply there only)"; \
	  $(BIN)/eph lab $(LOADTEST_SCENARIO) $(LOADTEST_FLAGS) $(ARGS); \
	else \
	  echo "no network namespaces here (needs root and iproute2): running on the host's loopback; host settings are read, never changed"; \
	  $(BIN)/eph run $(LOADTEST_SCENARIO) $(LOADTEST_FLAGS) $(ARGS); \
	fi
else
	$(BIN)/eph run $(LOADTEST_SCENARIO) $(LOADTEST_FLAGS) $(ARGS)
endif

bench: setup recorder ## Benchmarks on loopback: prints JSON figures
	@$(BIN)/python bench/run.py $(ARGS)

soak: setup system-deps recorder ## A lab run with faults on a schedule (root; SOAK=60m, default 3m; ARGS='--every 2m')
	@$(BIN)/python bench/soak.py $(if $(SOAK),--duration $(SOAK)) $(ARGS)

clean: ## Remove .venv, caches, the built manual and every run under reports/
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build
	find reports -mindepth 1 -not -name .gitkeep -exec rm -rf {} +
