# One command sets up a fresh machine and runs the suite:  make test
# (apt packages for the real test data and the local SLURM cluster, a virtualenv with the CPU torch wheel
#  pinned first so no CUDA build is pulled, the project, then pytest).
PY      ?= python3
VENV    ?= .venv
PIP      = $(VENV)/bin/pip -q
PYTHON   = $(VENV)/bin/python
APT_PKGS = dataset-fashion-mnist mate-backgrounds gcc libc6-dev

.PHONY: setup apt test demo cluster-up cluster-down clean

$(VENV)/.installed: setup.cfg constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -c constraints-cpu.txt torch==2.13.0
	$(PIP) install -c constraints-cpu.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

apt:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	else echo "not root: skipping apt ($(APT_PKGS)); tests needing them will skip"; fi

cluster-up:
	bash tests/slurm/cluster/up.sh

cluster-down:
	bash tests/slurm/cluster/down.sh

test: setup apt
	@if [ -f tests/slurm/cluster/up.sh ] && [ "$$(id -u)" = 0 ]; then bash tests/slurm/cluster/up.sh >/tmp/dimscale-slurm-up.log 2>&1 || { cat /tmp/dimscale-slurm-up.log; exit 1; }; fi
	DS_ACCELERATOR=cpu $(VENV)/bin/pytest -q -ra tests; rc=$$?; \
	  if [ -f tests/slurm/cluster/down.sh ] && [ "$$(id -u)" = 0 ]; then bash tests/slurm/cluster/down.sh >/dev/null 2>&1; fi; exit $$rc

demo: setup apt
	$(PYTHON) tools/demo.py

clean:
	rm -rf $(VENV) *.egg-info
