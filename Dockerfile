# Two stages. `build` installs the server's runtime virtualenv with `make install-runtime` (the
# Makefile is the one source of truth for install steps; tests/test_image.py builds the same
# virtualenv from the same build context and serves Explain calls from it). The final image is the
# same Python base plus that virtualenv only: no make, pip, dev tools, tests, examples, xgboost,
# lightgbm or Prometheus server. It runs as nobody and writes nothing outside /tmp, so it works
# with a read-only root filesystem (the manifests mount an emptyDir at /tmp).
# The build context is the whitelist in .dockerignore. Manifests and a compose file: deploy/.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    make install-runtime RUNTIME=/opt/sidelight PYTHON=python3

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sidelight /opt/sidelight
# HOME, numba's cache (shap compiles with numba) and matplotlib's config go to /tmp: the only
# writable path under a read-only root. One BLAS/OpenMP thread each beside onnxruntime's.
ENV PATH=/opt/sidelight/bin:$PATH \
    HOME=/tmp NUMBA_CACHE_DIR=/tmp/numba MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
    SIDELIGHT_MODELS_DIR=/models SIDELIGHT_PORT=50051 SIDELIGHT_METRICS_PORT=9090 \
    SIDELIGHT_HOST=0.0.0.0
WORKDIR /tmp
EXPOSE 50051 9090
USER 65534:65534
ENTRYPOINT ["sidelight", "serve"]
