# The two set-up commands of README.md: `make demo` and `make test`. Both install what a fresh
# Debian 12 machine lacks (apt-get as root, a venv for Python), build the guest into the user
# cache when it is missing (never rebuilding what is cached), then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages: QEMU, the guest's sources (kernel, busybox, musl) and the kernel build tools.
# libasan8/libubsan1: the sanitizer build of the native core that the tests run once.
APT_PACKAGES := qemu-system-x86 busybox-static musl-tools linux-source-6.1 bc flex bison \
	libelf-dev make gcc xz-utils cpio e2fsprogs ca-certificates libasan8 libubsan1

.PHONY: all setup system-deps venv assets demo test doctor bench clean
all: demo

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "[setup] apt-get install$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/include/*.h native/src/*.c native/src/*/*.c native/build_native.py native/guest/probes/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] pip install -e .[test] into $(VENV)"
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

setup: system-deps venv

assets: setup
	@$(PY) -m supermachine_jupyter assets

demo: assets
	@$(PY) -m supermachine_jupyter doctor
	@$(PY) -m supermachine_jupyter notebook notebooks/00-hello-vm.ipynb

test: assets
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

doctor: setup
	@$(PY) -m supermachine_jupyter doctor

bench: assets
	@for b in benchmarks/bench_*.py; do echo "== $$b"; (cd benchmarks && ../$(PY) $$(basename $$b)) || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info supermachine_jupyter/*.so
