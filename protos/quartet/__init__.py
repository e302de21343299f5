"""Quartet's wire contract: the generated protobuf / gRPC package `quartet.v1`."""
