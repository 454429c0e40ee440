# One image for every mailmesh service; the Deployment's command picks the service
# (`python -m svc_mailbox`, `python -m svc_ingest`, ...). Build: docker build -t mailmesh:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY mailmesh_common ./mailmesh_common
COPY svc_mailbox ./svc_mailbox
COPY svc_ingest ./svc_ingest
COPY svc_search ./svc_search
COPY svc_send ./svc_send
COPY svc_gateway ./svc_gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# The FoundationDB client library (libfdb_c) the `foundationdb` bindings load; it must match the
# server's protocol version (k8s/fdb/cluster.yaml runs 7.3).
ARG FDB_VERSION=7.3.43
ADD https://github.com/apple/foundationdb/releases/download/${FDB_VERSION}/foundationdb-clients_${FDB_VERSION}-1_amd64.deb /tmp/fdb-clients.deb
RUN dpkg -i /tmp/fdb-clients.deb && rm /tmp/fdb-clients.deb \
    && useradd --system --uid 10001 --home-dir /var/lib/mailmesh --create-home mailmesh
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/mailmesh
ENV MAILMESH_DATA_DIR=/var/lib/mailmesh MAILMESH_HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 50051 50052 50053 50054 50055 2525 5870 8080 1143
CMD ["mailmesh", "--help"]
