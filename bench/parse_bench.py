"""What parsing in a child process costs per small document: the same files parsed in a
thread of the service's process (the way ingest parsed before) and in a warm child of
ParserProcesses, plus the first parse, which starts the child.

    python -m bench.parse_bench [--rounds 200]
"""

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from services.ingest.parse_process import ParserProcesses
from services.ingest.parsers import DOCX, HTML, MARKDOWN, PDF, TEXT, parse

LIMITS = {"max_docx_bytes": 200 * 1024 * 1024, "max_chars": 20_000_000}
WORDS = "Parsing a small file costs little next to embedding its chunks. " * 20


def small_files(folder: Path) -> list[tuple[Path, str]]:
    import docx
    from reportlab.pdfgen import canvas

    files = {
        "note.txt": (WORDS.encode(), TEXT),
        "note.md": (f"# Title\n\n{WORDS}\n\n## Part\n\n{WORDS}".encode(), MARKDOWN),
        "note.html": (f"<html><body><h1>Title</h1><p>{WORDS}</p></body></html>".encode(), HTML),
    }
    document = docx.Document()
    document.add_heading("Title", level=1)
    document.add_paragraph(WORDS)
    buffer = io.BytesIO()
    document.save(buffer)
    files["note.docx"] = (buffer.getvalue(), DOCX)
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for line in range(10):
        pdf.drawString(72, 800 - 16 * line, WORDS[:90])
    pdf.save()
    files["note.pdf"] = (buffer.getvalue(), PDF)
    paths = []
    for name, (data, mime_type) in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append((path, mime_type))
    return paths


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        files = small_files(Path(folder))
        print(f"{len(files)} small files (txt, md, html, docx, pdf), {rounds} rounds; {load()}")
        parsers = ParserProcesses(timeout=60, memory_bytes=2 * 1024**3, **LIMITS)
        try:
            started = time.perf_counter()
            await parsers.parse(*files[0])
            print(
                f"first parse, starting the child: {(time.perf_counter() - started) * 1e3:.0f} ms"
            )
            for path, mime_type in files:
                thread, child = [], []
                for _ in range(rounds):
                    started = time.perf_counter()
                    await asyncio.to_thread(parse, path, mime_type, **LIMITS)
                    thread.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await parsers.parse(path, mime_type)
                    child.append(time.perf_counter() - started)
                in_thread = statistics.median(thread) * 1e3
                in_child = statistics.median(child) * 1e3
                print(
                    f"{path.suffix:6} median per file: thread {in_thread:.2f} ms, "
                    f"warm child {in_child:.2f} ms (+{in_child - in_thread:.2f} ms)"
                )
        finally:
            await parsers.close()
    print(load())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    asyncio.run(main(parser.parse_args().rounds))
