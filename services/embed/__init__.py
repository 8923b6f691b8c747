"""The embed service: one sentence-transformers model behind a micro-batching gRPC API."""
