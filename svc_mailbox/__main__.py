"""`python -m svc_mailbox`."""

from svc_mailbox.server import run

run()
