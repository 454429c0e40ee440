"""Generated protobuf contracts of mailmesh; see protos/. Do not edit."""
