"""The ingest service: documents in, parsed text, token-sized chunks and vectors out."""
