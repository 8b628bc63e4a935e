# Touchpoint Gateway: the two commands a new user needs are `make demo` and `make test`.
# Both install what they need: Debian packages (as root, or with sudo) and a .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian / Raspberry Pi OS packages: the broker for tests and the demo, zbar for pyzbar,
# dbus-daemon for the private bus the BLE simulator runs on, venv support, systemd's
# analyzer for checking the unit files, and promtool (package prometheus) for linting
# /metrics in a test, mmdebstrap for the test that installs the packages into a fresh
# Debian root, and libfuse2 for the power-cut test's FUSE filesystem (fusepy loads it with
# ctypes; as root it mounts without fusermount).
APT_PACKAGES := mosquitto libzbar0 dbus python3-venv python3-pip systemd prometheus mmdebstrap \
	libfuse2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install system-deps lint bench bench-peer fuzz soak clean help dist lock \
	test-fresh-root test-arm64 test-arm64-package powercut

help:
	@echo "make demo   run the daemon against simulated hardware (Ctrl-C stops it)"
	@echo "make test   run the whole test suite"
	@echo "make test-arm64-package  the arm64 .deb in an arm64 root under qemu (root; slow)"
	@echo "make lint   ruff and mypy --strict"
	@echo "make bench  every benchmark, one report in $(BENCH_OUT)/ (md, json, plots); several minutes"
	@echo "make fuzz   the long fuzz run (hypothesis deep profile + atheris)"
	@echo "make soak   a simulated week of a busy store in ~10 min (SOAK_DAYS, SOAK_MINUTES)"
	@echo "make powercut  the long power-cut profile (POWERCUT_CUTS=130 cuts; root, FUSE)"
	@echo "make dist   Debian packages for amd64 and arm64 in dist/ (DIST_ARCH=amd64 for one)"
	@echo "make lock   regenerate systemd/debian/requirements.lock (uv, every platform, hashes)"
	@echo "make test-fresh-root  make demo and make test in a fresh Debian 12 root (mmdebstrap, root)"
	@echo "make test-arm64       the same in an arm64 root under qemu-user-static"

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The daemon with its dev extra, and the simulators (their own distribution, with the camera
# extra and the pytest plugin's entry point), both editable.
$(STAMP): pyproject.toml simulators/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e './simulators[camera]'
	touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	$(BIN)/python -m simulators.rig.demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check gateway drivers simulators tests
	$(BIN)/mypy

# The benchmark report: report.md, report.json and plots in BENCH_OUT.  To refresh the
# README's table too: make bench BENCH_ARGS='--readme README.md'
BENCH_OUT  ?= bench-report
BENCH_ARGS ?=
bench: bench-peer
	$(BIN)/python -m tests.bench --out $(BENCH_OUT) $(BENCH_ARGS)

# bench ble's peer, TheengsGateway: its decoder has no wheel, so it is built here with a
# compiler, CMake and Python headers from apt.  If that fails, bench ble says the peer is
# not installed and measures everything else.
BENCH_PEER_APT := g++ cmake python3-dev
bench-peer: install
	@$(BIN)/python -c "import TheengsGateway" 2>/dev/null || { \
	  echo "installing bench ble's peer (TheengsGateway; built from source: $(BENCH_PEER_APT))"; \
	  { $(MAKE) --no-print-directory system-deps APT_PACKAGES="$(BENCH_PEER_APT)" && \
	    $(BIN)/pip install -q -e '.[dev,bench-peer]' -e './simulators[camera]'; } || \
	  echo "bench: TheengsGateway could not be built; bench ble runs without its peer"; }

# make demo and make test as a new user runs them: in a fresh Debian 12 root (mmdebstrap,
# Debian's python3, no compiler) made from the committed HEAD.  As root; see README.md.
FRESH_ARGS ?=
test-fresh-root:
	.ci/fresh-root --arch amd64 $(FRESH_ARGS)

test-arm64:
	.ci/fresh-root --arch arm64 $(FRESH_ARGS)

fuzz: install
	TOUCHPOINT_FUZZ=deep $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=0 tests/fuzz $(PYTEST_ARGS)

# The soak (tests/soak/): samples, plot and rig files in SOAK_OUT; the report and plot
# are also written to tests/soak/REPORT.md and tests/soak/soak.png, to be committed.
SOAK_DAYS    ?= 7
SOAK_MINUTES ?= 10
SOAK_OUT     ?= soak-out
soak: install
	rm -rf $(SOAK_OUT)/work
	$(BIN)/python -m tests.soak.soak_run --days $(SOAK_DAYS) --minutes $(SOAK_MINUTES) \
	  --out $(SOAK_OUT) --report tests/soak

# The power-cut test's long profile (tests/powercut/; make test runs 12 cuts and a
# 4-cut negative control).  Prints the figures; about 15 minutes.
# Its files (the daemon's log, the central's events, each cut's database with
# POWERCUT_KEEP=1) stay in POWERCUT_OUT.
POWERCUT_CUTS ?= 130
POWERCUT_CONTROL_CUTS ?= 30
POWERCUT_OUT ?= powercut-out
powercut: install
	POWERCUT_CUTS=$(POWERCUT_CUTS) POWERCUT_CONTROL_CUTS=$(POWERCUT_CONTROL_CUTS) \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider --timeout=0 \
	  --basetemp=$(POWERCUT_OUT) tests/powercut $(PYTEST_ARGS)

# The store box's packages: binary wheels for the target from the lock, no compiler.
DIST_ARCH ?= amd64,arm64
dist: install
	$(BIN)/python systemd/debian/build.py --arch $(DIST_ARCH) --out dist

# uv resolves one lock for every target platform at once (pip-tools resolves only for
# the machine it runs on), with the hashes pip then checks.
lock: install
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra camera --universal --generate-hashes \
	  --python-version 3.11 --no-header --no-annotate -o systemd/debian/requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The arm64 package installed into an arm64 Debian 12 root under qemu-user-static
# (binfmt_misc): --version, check-config, then the fast tests against the installed
# package (TOUCHPOINT_ARM64_TESTS picks others).  Needs root; slow; not part of `make test`.
test-arm64-package: install
	TOUCHPOINT_TEST_ARM64=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		tests/systemd/test_dist_install.py -k arm64
