"""The llm service: model catalogue, lifecycle, generation settings and streaming generation."""
