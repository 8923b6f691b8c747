"""Builds the pyref evaluation corpus (BEIR layout) from Python's own documentation.

Documents: the language reference topics that `help()` shows (pydoc_data), and the
docstrings of standard-library modules and their public functions and classes. The
queries and relevance judgements in pyref/ were written by hand against these IDs.
Run with the Python whose docs you want: python bench/data/make_pyref.py bench/data/pyref
"""

import contextlib
import importlib
import inspect
import io
import json
import sys
import warnings
from pathlib import Path
from pydoc_data.topics import topics

# Modules that act on import (open a browser, print) or are platform specific.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "msvcrt",
    "winreg",
    "winsound",
    "_msi",
    "msilib",
    "nturl2path",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__hello__",
    "__phello__",
}


def documents():
    for name, text in sorted(topics.items()):
        yield {"_id": f"topic:{name}", "title": f"Python language reference: {name}", "text": text}
    for module_name in sorted(sys.stdlib_module_names):
        if module_name.startswith("_") or module_name in SKIP:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:
            continue
        doc = inspect.getdoc(module) or ""
        if len(doc) >= 80:
            yield {"_id": f"mod:{module_name}", "title": f"{module_name} module", "text": doc}
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) != module_name:
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc) >= 120:
                yield {
                    "_id": f"api:{module_name}.{attr}",
                    "title": f"{module_name}.{attr}",
                    "text": doc,
                }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    with (out / "corpus.jsonl").open("w") as f:
        for doc in documents():
            if doc["_id"] not in seen:
                seen.add(doc["_id"])
                f.write(json.dumps(doc) + "\n")
    print(f"{len(seen)} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
