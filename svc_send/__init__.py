"""svc_send: see ../shared/DESIGN.md "The services"."""
