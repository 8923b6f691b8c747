"""Runs every benchmark, or those named: python -m bench [runtime embed embed_memory ingest
llm search ... load]."""

import importlib
import sys

BENCHES = [
    "runtime",
    "embed",
    "embed_memory",
    "ingest",
    "search",
    "llm",
    "vector",
    "sessions",
    "load",
]
# Benchmarks whose module is not bench.<name>_bench.
MODULES = {"embed_memory": "bench.embed_memory", "load": "bench.load"}


def main() -> None:
    chosen = sys.argv[1:] or BENCHES
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHES}")
    for name in chosen:
        module_name = MODULES.get(name, f"bench.{name}_bench")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            print(f"{name}: no benchmark yet")
            continue
        module.main()
        print(flush=True)


if __name__ == "__main__":
    main()
