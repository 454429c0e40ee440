"""`python -m svc_search`."""

from svc_search.server import run

run()
