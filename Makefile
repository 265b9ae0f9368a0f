# pcsc-ebpf-spy — a newcomer on Debian 12 runs:  sudo make setup && sudo make test
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
# Headers of the running kernel where the distribution has them (Ubuntu
# runners), else the newest generic ones (Debian; see ebpf_pcsc/kheaders.py).
KHEADERS := $(shell apt-cache show linux-headers-$$(uname -r) >/dev/null 2>&1 \
	&& echo linux-headers-$$(uname -r) || echo linux-headers-$(ARCH))
# bcc (python3-bpfcc) is Debian's; click, tabulate and pytest come from
# Debian too, and the venv sees them (--system-site-packages).
DEB_PACKAGES := python3-bpfcc python3-venv python3-setuptools python3-click python3-tabulate \
	python3-pytest pcscd libpcsclite1 libpcsclite-dev vsmartcard-vpcd pcsc-tools opensc \
	gcc libc6-dev make debootstrap meson ninja-build flex perl $(KHEADERS)

.PHONY: setup packages venv test demo bench clean

setup: packages venv
	@echo "ready: $(VENV)/bin/pcsc-ebpf-spy"

packages:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/bin/pcsc-ebpf-spy

$(VENV)/bin/pcsc-ebpf-spy: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@test -x $@ && touch $@

test: venv
	$(PY) -m pytest -v -rs tests

demo: venv
	$(PY) tests/demo.py

# Not a test: measures side by side and writes bench-results.json.
bench: venv
	$(PY) tests/bench.py

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
