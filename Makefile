# The benchmark (bench/README.md). Run as root on a machine prepared by tools/install-deps.sh
# (plus socat, iperf3, python3-matplotlib). Results go to bench/results/.
PYTHON ?= /usr/bin/python3
export PYTHONPATH := $(CURDIR)

.PHONY: bench bench-smoke

bench:
	$(PYTHON) -m bench.run --out bench/results

bench-smoke:
	$(PYTHON) -m bench.run --smoke --out /tmp/imgmig-bench-smoke
