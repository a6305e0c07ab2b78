"""The sidecar: gRPC servicer, data plane, model repository, store, metrics, config and CLI."""

import os

# numpy's multi-threaded BLAS next to onnxruntime on a small machine slowed model calls by 9-44%
# (shared/field-notes.md); one BLAS thread per process unless the operator says otherwise.
# Set here, before anything in the service imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
