"""The `mailmesh` command."""
