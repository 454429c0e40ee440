"""`python -m svc_gateway`."""

from svc_gateway.server import run

run()
