# The same install steps as the README's `make serve` / `make test` (Makefile target `install`,
# which also installs Debian's prometheus/promtool for the test suite when apt-get is usable).
# Kubernetes manifests and a compose file using this image: deploy/.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install && rm -rf /var/lib/apt/lists/*
ENV SIDELIGHT_MODELS_DIR=/models SIDELIGHT_PORT=50051 SIDELIGHT_METRICS_PORT=9090 \
    SIDELIGHT_HOST=0.0.0.0
EXPOSE 50051 9090
USER 65534
ENTRYPOINT [".venv/bin/sidelight", "serve"]
