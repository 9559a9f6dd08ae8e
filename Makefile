# Two commands do everything on a fresh machine:
#   make demo PROMPT="a red circle moving right"   set up, start the mesh, write a video, print its path
#                                            (PORT=51000: the gateway's gRPC port, `t2v up --port`; default 50050)
#   make test                                set up, run every test (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; a GPU host may set TORCH_SPEC to its own.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= a red circle moving right on a black background
OUTPUT ?= out/video.mp4
PORT   ?= 50050

.PHONY: setup demo test protos clean promtool chromium postgresql

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/t2v up --port $(PORT) --generate "$(PROMPT)" -o $(OUTPUT)

# Two workers, each file on one of them (module fixtures stay whole): most tests wait on processes they
# start, so two share 2 cores well. The schemathesis fuzz runs alone after: its generated cases do not
# survive xdist's collection (each worker would see only /healthz). One torch thread a process beside the
# other worker: each process's own pool of two, spinning, oversubscribed the 2 cores (15.2 min against 17.0
# on this 2-core machine, 2026-12-01; the smoke training 58 s against 154 s).
test: setup promtool chromium postgresql
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile \
		--ignore=tests/integration/test_fuzz_http.py
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/integration/test_fuzz_http.py

# The metrics tests check every service's /metrics with promtool (Debian/Ubuntu package prometheus).
# Installed quietly when missing and apt-get exists; elsewhere the tests fail and say how to get it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
promtool:
	@command -v promtool >/dev/null || ! command -v apt-get >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq prometheus >/dev/null)

# The web page's test drives Debian's chromium through Playwright (never `playwright install`: no
# browser downloads). Installed quietly when missing, as promtool is; elsewhere that test fails and says how.
chromium:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq chromium >/dev/null)

# The job-store tests run a throwaway PostgreSQL cluster (tests/postgres.py: initdb, postgres), found on
# PATH or in Debian's /usr/lib/postgresql/<version>/bin. Installed quietly when missing, as promtool is;
# elsewhere those tests fail and say how to get it.
PG_FOUND := command -v initdb >/dev/null && command -v pg_ctl >/dev/null || \
  ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1
postgresql:
	@$(PG_FOUND) || ! command -v apt-get >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq postgresql >/dev/null)

protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) out
