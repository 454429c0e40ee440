"""svc_ingest: see ../shared/DESIGN.md "The services"."""
