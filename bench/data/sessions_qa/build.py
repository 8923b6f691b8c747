"""Builds the sessions_qa documents from public text on this machine and checks the
hand-written questions against them.

    python bench/data/sessions_qa/build.py            # render documents/, then check
    python bench/data/sessions_qa/build.py --check    # check only (what the bench does)

Documents (documents/*.txt, plain text, as ingest receives them):

- eight Debian 12 (bookworm) manual pages, rendered with man-db 2.11.2 and groff
  1.22.4 as `MANWIDTH=100 man --nh --nj -l <page> | col -bx` (no hyphenation, no
  justification, so words stay whole) with trailing spaces stripped: gzip(1) (gzip
  1.12-1), bzip2(1) (bzip2 1.0.8-5+b1), timeout(1) (coreutils 9.1-1), fstab(5) (mount
  2.38.1-5+deb12u3), apt_preferences(5) (apt 2.6.1), gitignore(5) (git-man
  1:2.39.5-0+deb12u3), adduser.conf(5) (adduser 3.134), deb-version(7) (dpkg-dev
  1.21.22). Their licences are those of the packages (GPL for most, a BSD-style licence
  for bzip2, the FSF's verbatim-copying permission for gzip), per
  /usr/share/doc/<package>/copyright.
- python-reference.txt: four topics of Python 3.11.7's language reference as `help()`
  shows them (`pydoc_data.topics`: assert, power, integers, truth), joined with a blank
  line (PSF licence).

questions.jsonl was written by hand after reading those documents: one JSON object per
line with `id`, `question`, `answers` (accepted variants, matched case-insensitively as
whole words in the model's answer), `document` (the file holding the fact) and
`evidence` (a verbatim passage of that document stating the fact; whitespace and line
breaks may differ). The check below makes sure every evidence passage is in its document
(and in no other), that it contains one of the accepted answers, and that no accepted
answer is already written in the question (which would make matching it free).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

HERE = Path(__file__).resolve().parent
DOCUMENTS = HERE / "documents"
QUESTIONS = HERE / "questions.jsonl"

MAN_PAGES = {
    "gzip.txt": "/usr/share/man/man1/gzip.1.gz",
    "bzip2.txt": "/usr/share/man/man1/bzip2.1.gz",
    "timeout.txt": "/usr/share/man/man1/timeout.1.gz",
    "fstab.txt": "/usr/share/man/man5/fstab.5.gz",
    "apt_preferences.txt": "/usr/share/man/man5/apt_preferences.5.gz",
    "gitignore.txt": "/usr/share/man/man5/gitignore.5.gz",
    "adduser.conf.txt": "/usr/share/man/man5/adduser.conf.5.gz",
    "deb-version.txt": "/usr/share/man/man7/deb-version.7.gz",
}
PYTHON_TOPICS = ("assert", "power", "integers", "truth")


def render_man(page: str) -> str:
    env = dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8")
    rendered = subprocess.run(
        ["man", "--nh", "--nj", "-l", page], env=env, capture_output=True, check=True
    ).stdout
    plain = subprocess.run(
        ["col", "-bx"], input=rendered, env=env, capture_output=True, check=True
    ).stdout.decode()
    return "\n".join(line.rstrip() for line in plain.splitlines()).strip() + "\n"


def build() -> None:
    DOCUMENTS.mkdir(exist_ok=True)
    for name, page in MAN_PAGES.items():
        (DOCUMENTS / name).write_text(render_man(page))
    python = "\n\n".join(topics[name].strip() for name in PYTHON_TOPICS)
    (DOCUMENTS / "python-reference.txt").write_text(python + "\n")


def evidence_pattern(evidence: str) -> re.Pattern:
    """The evidence as a pattern: any run of whitespace may differ, and a line may break
    after a hyphen inside a word (the way man wraps `upstream-version`)."""
    words = [re.escape(w).replace(r"\-", r"-\s*") for w in evidence.split()]
    return re.compile(r"\s+".join(words))


def answer_pattern(answer: str) -> re.Pattern:
    """A case-insensitive match of one accepted answer as whole words: an answer that
    starts (ends) with a letter or digit must not follow (precede) another one, so "6"
    does not match "16" and "1" does not match the label "[D1]"."""
    head = r"(?<!\w)" if re.match(r"\w", answer) else ""
    tail = r"(?!\w)" if re.search(r"\w$", answer) else ""
    return re.compile(head + re.escape(answer) + tail, re.IGNORECASE)


def load_questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]


def load_documents() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(DOCUMENTS.glob("*.txt"))}


def check(questions: list[dict], documents: dict[str, str]) -> list[str]:
    problems = []
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        problems.append("question ids repeat")
    for q in questions:
        where = f"{q['id']}"
        if q["document"] not in documents:
            problems.append(f"{where}: no document {q['document']}")
            continue
        pattern = evidence_pattern(q["evidence"])
        if not pattern.search(documents[q["document"]]):
            problems.append(f"{where}: evidence not found in {q['document']}")
        others = [name for name, text in documents.items() if name != q["document"]]
        for name in others:
            if pattern.search(documents[name]):
                problems.append(f"{where}: evidence also in {name}")
        evidence = " ".join(q["evidence"].split())
        if not any(answer_pattern(a).search(evidence) for a in q["answers"]):
            problems.append(f"{where}: no accepted answer in the evidence")
        for answer in q["answers"]:
            if answer_pattern(answer).search(q["question"]):
                problems.append(f"{where}: the question already says {answer!r}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check only, render nothing")
    args = parser.parse_args()
    if not args.check:
        build()
    questions, documents = load_questions(), load_documents()
    problems = check(questions, documents)
    for problem in problems:
        print(problem)
    size = sum(len(text) for text in documents.values())
    print(f"{len(documents)} documents ({size} characters), {len(questions)} questions")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
