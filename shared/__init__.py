"""Code shared by several services: image ingestion, the findings schema, config, logging, gRPC helpers."""
