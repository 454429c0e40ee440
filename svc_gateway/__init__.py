"""svc_gateway: see ../shared/DESIGN.md "The services"."""
