"""`python -m svc_ingest`."""

from svc_ingest.server import run

run()
