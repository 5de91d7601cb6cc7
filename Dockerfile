# dispatcher in a container. Build: docker build -t dispatcher .
# Run (docs/deploy.md): docker run -d --name dispatcher --stop-timeout 45 \
#   -v dispatcher-state:/var/lib/dispatcher \
#   -v "$PWD/config:/etc/dispatcher:ro" dispatcher
# Mount the config folder, not the file: an editor replaces the file, and a file mount
# would keep showing the old one to a reload.
# Stop timeout: above daemon.shutdown_grace + kill_grace (30s + 5s by default), or
# Docker's default of 10s SIGKILLs steps that were still draining.
# scripts/check-image builds this and checks it under podman (docs/deploy.md).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
# pip and setuptools install the package, then leave: the runtime venv needs neither.
RUN python -m venv /opt/dispatcher \
    && /opt/dispatcher/bin/pip install --no-cache-dir . \
    && /opt/dispatcher/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim
# tini is PID 1: it forwards SIGTERM to the daemon (which drains) and reaps orphans.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 dispatcher \
    && useradd --uid 10001 --gid dispatcher --no-create-home --no-log-init \
        --home-dir /var/lib/dispatcher --shell /usr/sbin/nologin dispatcher \
    && install -d -o dispatcher -g dispatcher -m 0750 /var/lib/dispatcher
COPY --from=build /opt/dispatcher /opt/dispatcher
# An example configuration; mount your own over it (read-only is enough).
COPY config/dispatcher.toml /etc/dispatcher/dispatcher.toml
ENV PATH=/opt/dispatcher/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DISPATCHER_CONFIG=/etc/dispatcher/dispatcher.toml \
    DISPATCHER_DATABASE__PATH=/var/lib/dispatcher/dispatcher.db
# Numeric, so that runtimes can check "non-root" without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/dispatcher
VOLUME ["/var/lib/dispatcher"]
STOPSIGNAL SIGTERM
# Exit 0 only while a live daemon heartbeats on the database (69 otherwise).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["dispatcher", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "dispatcher"]
CMD ["run"]
