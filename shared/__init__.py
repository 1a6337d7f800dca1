"""Code used by several services: image ingestion, the findings schema, config, logging, gRPC."""
