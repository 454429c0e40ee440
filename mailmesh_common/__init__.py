"""Code shared by every mailmesh service: config, telemetry, gRPC bootstrap, streams, KV, blobs, MIME."""
