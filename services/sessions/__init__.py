"""The sessions service: threaded chat over the caller's documents, with citations,
long-term memory of every exchange, automatic tags and session search."""
