"""Developer tools: code generation from the protobuf contracts."""
