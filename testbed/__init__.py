"""Test tooling for imgmig (not shipped): a real CRIU, two network namespaces as two
nodes, a verifiable workload, the daemons run from this tree and a migration driver.

Used by tests/test_real_criu.py, tools/demo.sh and the benchmark.
"""
