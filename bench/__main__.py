"""Runs every benchmark, or those named: python -m bench [runtime embed ingest llm search ...]."""

import importlib
import sys

BENCHES = ["runtime", "embed", "ingest", "search", "llm", "vector", "sessions"]


def main() -> None:
    chosen = sys.argv[1:] or BENCHES
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHES}")
    for name in chosen:
        try:
            module = importlib.import_module(f"bench.{name}_bench")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}_bench":
                raise
            print(f"{name}: no benchmark yet")
            continue
        module.main()
        print(flush=True)


if __name__ == "__main__":
    main()
