"""svc_search: see ../shared/DESIGN.md "The services"."""
