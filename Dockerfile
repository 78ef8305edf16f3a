# dlrhub in a container: `dlrhub serve` as a non-root user, the SQLite file on the /data volume.
#   docker build -t dlrhub .     (or deploy/compose.yaml)
# tests/test_container.py runs what this file runs (the pip install, the command, the health check)
# without Docker, which the CI machine does not have.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DLRHUB_DB=/data/dlrhub.db \
    DLRHUB_LISTEN=0.0.0.0:50051 \
    DLRHUB_HTTP_LISTEN=0.0.0.0:8080 \
    DLRHUB_ADMIN_LISTEN=0.0.0.0:9464

# The two distributions, from the checkout: the client (with the generated code) and the server.
WORKDIR /src
COPY LICENSE README.md pyproject.toml ./
COPY gen/ gen/
COPY client/ client/
COPY server/ server/
RUN pip install --no-cache-dir --disable-pip-version-check ./client .

RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home dlrhub \
    && mkdir /data && chown dlrhub:dlrhub /data
USER dlrhub
WORKDIR /data
VOLUME /data

# gRPC, the provider webhooks, the admin port (/metrics: publish it only where providers cannot reach).
EXPOSE 50051 8080 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["dlrhub", "health", "--timeout", "3"]
CMD ["dlrhub", "serve"]
