"""The ragmesh command line: `ragmesh --help`."""

from services.cli.app import main

__all__ = ["main"]
