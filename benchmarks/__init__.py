"""Benchmarks: `make bench` (python -m benchmarks.run) writes docs/benchmarks.md."""

import os

# One BLAS thread, as the service runs (service/__init__.py): with two, OpenBLAS's threads spin
# on after a larger product and take the second core from everything timed next (measured: an
# unchanged estimator 1.5-2x slower in CPU time after one that solved bigger systems). Set
# before anything here imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
