"""`python -m svc_send`."""

from svc_send.server import run

run()
