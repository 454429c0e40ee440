"""The REST resources of the gateway, one module each; ROUTERS are mounted by svc_gateway.app."""

from __future__ import annotations

from fastapi import APIRouter

from svc_gateway.rest import auth, drafts, labels, messages, profile, threads

ROUTERS: list[APIRouter] = [auth.router, profile.router, labels.router, messages.router, threads.router,
                            drafts.router]
