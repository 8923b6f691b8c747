"""Builds the curlref evaluation corpus (BEIR layout) from curl's documentation as Debian
ships it.

curlref is our second retrieval set, made so that exact terms matter more than
paraphrase: most of its questions name a command line flag (`--retry-connrefused`), a
libcurl option or info (`CURLOPT_LOW_SPEED_LIMIT`, `CURLINFO_TOTAL_TIME_T`), an error code
(`CURLE_PEER_FAILED_VERIFICATION`, exit code 28), a build define, an environment
variable, a version number or an issue number; the rest are plain-language
paraphrases. pyref (bench/data/pyref) leans the other way, so a fusion that has to hold
on both cannot win by favouring one channel.

Sources, all curl 7.88.1 as packaged by Debian 12 (bookworm), fetched with the
ordinary client: `apt-get download curl libcurl4-doc` (version 7.88.1-10+deb12u15).
Licence: the curl licence (SPDX `curl`, an MIT/X derivative: use, copy and modify with
the copyright notice kept), per each package's /usr/share/doc/*/copyright; copyright
Daniel Stenberg, <daniel@haxx.se>, et al. To rebuild:

    mkdir /tmp/curldeb && cd /tmp/curldeb && apt-get download curl libcurl4-doc
    for f in *.deb; do dpkg -x "$f" root; done
    python bench/data/make_curlref.py /tmp/curldeb/root bench/data/curlref

What becomes a passage (every `_id` is derived from the file and its headings, so a
rebuild from the same packages gives the same ids):

- `cli:--NAME`: each option of the curl(1) man page (usr/share/man/man1/curl.1.gz),
  titled by its synopsis line (`curl -m, --max-time <fractional seconds>`);
  `curl.1#SECTION` for its other sections, and `curl.1#EXIT-CODES-N` for each exit code.
- `man3:NAME`: each libcurl man page (usr/share/man/man3: CURLOPT_*, CURLINFO_*,
  CURLMOPT_*, CURLSHOPT_*, curl_* functions, libcurl-*), titled by its NAME line;
  libcurl-errors is split into one passage per error code (`man3:libcurl-errors#CURLE_...`)
  and the overview pages in SPLIT_MAN3 into one passage per section.
- `doc:FILE#HEADING`: the documents in usr/share/doc/libcurl4 (markdown split at its
  headings; FAQ, KNOWN_BUGS and TODO split at their numbered items), minus the people,
  process and internals pages in SKIP_DOCS.
- `changes:VERSION#N`: each entry of the upstream changelog (usr/share/doc/curl/
  changelog.gz) for the releases in CHANGELOG_VERSIONS, N counting from the top.

Man pages are turned into plain text by the small roff reader below (fonts and escapes
dropped, `.nf` blocks kept as written, no hyphenation). Any passage longer than
MAX_CHARS is cut at paragraph breaks into `ID~2`, `ID~3`, ... (the first part keeps the
plain id); passages under 20 characters are dropped. The result is 1,988 passages
(1.8 MB): 252 command line options, 99 other curl(1) passages (sections, exit codes),
744 man3 passages, 610 from the docs and 283 from the changelog.

queries.jsonl and qrels/test.tsv were written by hand and are not rebuilt by this
script: 84 questions as a curl user would type them, 60 naming an exact flag, option,
error code or string, build define, environment variable, version or issue number
(c01-c60) and 24 in plain words without the identifier (c61-c84). Each question was
written while reading the passage that answers it; the other passages that answer it or
help were then found by grepping corpus.jsonl for the names involved (the option, its
CURLOPT / --flag counterpart, its "See also" neighbours, the error code) and judged by
reading them. A second pass (pooling) read the top 5 documents of each channel's run
(bench/fusion_study.py) that were still unjudged and judged them by the same rules,
and added the curl_easy_setopt / curl_easy_getinfo overview part that lists the option
to every question naming one. Grades: 2 = answers the question on its own (136);
1 = related or partial (164): the counterpart in the other interface, a neighbouring
option the answer points to, an overview, FAQ or changelog entry that mentions it
without the detail. Unjudged passages count as 0.
"""

import gzip
import json
import re
import sys
from pathlib import Path

MAX_CHARS = 4000
MIN_CHARS = 20
CHANGELOG_VERSIONS = ("7.88.1", "7.88.0")
# Split into one passage per section (.SH); libcurl-errors goes down to each code.
SPLIT_MAN3 = {"libcurl-tutorial", "libcurl-security", "libcurl-multi", "libcurl-env"}
SKIP_DOCS = {
    "BUFREF.md",  # internal APIs
    "BUG-BOUNTY.md",
    "CHECKSRC.md",
    "CODE_OF_CONDUCT.md",
    "CODE_REVIEW.md",
    "CODE_STYLE.md",
    "CONNECTION-FILTERS.md",
    "DYNBUF.md",
    "EARLY-RELEASE.md",
    "GOVERNANCE.md",
    "HELP-US.md",
    "INTERNALS.md",
    "NEW-PROTOCOL.md",
    "README",
    "README.md",
    "RELEASE-PROCEDURE.md",
    "SECURITY-PROCESS.md",
    "THANKS",
}

# --- roff ------------------------------------------------------------------------------

_ESCAPES = {
    r"\(aq": "'",
    r"\(dq": '"',
    r"\(co": "(C)",
    r"\(em": "--",
    r"\(en": "-",
    r"\(bu": "*",
    r"\(lq": '"',
    r"\(rq": '"',
    r"\-": "-",
    r"\&": "",
    r"\e": "\\",
    r"\ ": " ",
    r"\~": " ",
    r"\|": "",
    r"\^": "",
    r"\c": "",
}
_FONT = re.compile(r"\\f(\(..|\[[^]]*\]|.)")


def unescape(text: str) -> str:
    text = _FONT.sub("", text)
    text = text.replace("\\\\", "\x00")
    for escape, plain in _ESCAPES.items():
        text = text.replace(escape, plain)
    return text.replace("\x00", "\\")


def macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff(source: str) -> tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]:
    """Reads a man page: its .TH name and its sections as (heading, intro, items), each
    item a top-level .IP/.TP entry as (tag, text). Nested entries (inside .RS) stay in
    their parent's text as `tag: text` lines."""
    name = ""
    sections: list[tuple[str, str, list[tuple[str, str]]]] = []
    heading, intro, items = "", "", []
    lines: list[str] = []  # the current block (intro or item) being read
    tag: str | None = None  # the current top-level item's tag
    depth, fill, pending_tag = 0, True, False

    def block() -> str:
        text = "\n".join(lines).strip()
        lines.clear()
        return re.sub(r"\n{3,}", "\n\n", text)

    def end_item() -> None:
        nonlocal intro, tag
        text = block()
        if tag is None:
            intro = f"{intro}\n\n{text}".strip() if text else intro
        else:
            items.append((tag, text))
        tag = None

    def end_section() -> None:
        end_item()
        if heading and (intro or items):
            sections.append((heading, intro, list(items)))

    def words(text: str) -> None:
        if fill and lines and lines[-1] and not pending_tag:
            lines[-1] += " " + text
        else:
            lines.append(text)

    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"")) or raw.strip() == ".":
            continue
        if pending_tag and not raw.startswith("."):
            pending_tag = False
            text = unescape(raw).strip()
            if depth == 0:
                end_item()
                tag = text
            else:
                lines += ["", f"{text}:"]
            continue
        if not raw.startswith("."):
            text = unescape(raw)
            if not fill:
                lines.append(text)
            elif not text.strip():
                lines.append("")
            else:
                words(text.strip())
            continue
        command, _, rest = raw[1:].partition(" ")
        args = macro_args(rest)
        if command == "TH":
            name = unescape(args[0]) if args else ""
        elif command in ("SH", "SS"):
            end_section()
            heading, intro, items = unescape(" ".join(args)).strip(), "", []
            depth = 0
        elif command == "IP":
            text = unescape(args[0]).strip() if args else ""
            if depth == 0 and text:
                end_item()
                tag = text
            else:
                lines += ["", f"{text}:" if text else ""]
        elif command == "TP":
            pending_tag = True
        elif command in ("PP", "P", "LP", "br", "sp"):
            lines.append("")
        elif command == "nf":
            fill = False
            lines.append("")
        elif command == "fi":
            fill = True
            lines.append("")
        elif command == "RS":
            depth += 1
        elif command == "RE":
            depth = max(0, depth - 1)
        elif command in ("B", "I"):
            text = unescape(" ".join(args))
            if pending_tag:
                pending_tag = False
                if depth == 0:
                    end_item()
                    tag = text
                else:
                    lines += ["", f"{text}:"]
            else:
                words(text)
        elif command in ("BR", "BI", "IB", "IR", "RI", "RB"):
            words(unescape("".join(args)))
    end_section()
    return name, sections


def section_text(intro: str, items: list[tuple[str, str]]) -> str:
    parts = [intro] if intro else []
    parts += [f"{tag}\n{text}" if text else tag for tag, text in items]
    return "\n\n".join(parts)


# --- splitting -------------------------------------------------------------------------


def cut(text: str) -> list[str]:
    """Cuts text longer than MAX_CHARS at paragraph breaks."""
    if len(text) <= MAX_CHARS:
        return [text]
    pieces, piece = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        if piece and len(piece) + len(paragraph) > MAX_CHARS:
            pieces.append(piece)
            piece = ""
        piece = f"{piece}\n\n{paragraph}" if piece else paragraph
    return [*pieces, piece] if piece else pieces


def slug(heading: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", heading).strip("-")[:60] or "top"


class Ids:
    """Makes ids unique within a file by suffixing repeats with -2, -3, ..."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, key: str) -> str:
        self.seen[key] = self.seen.get(key, 0) + 1
        return key if self.seen[key] == 1 else f"{key}-{self.seen[key]}"


# --- sources ---------------------------------------------------------------------------


def read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def curl_1(root: Path):
    _, sections = roff(read(root / "usr/share/man/man1/curl.1.gz"))
    ids = Ids()
    for heading, intro, items in sections:
        key = slug(heading)
        if heading == "OPTIONS":
            if intro:
                yield {"_id": "curl.1#OPTIONS", "title": "curl(1) OPTIONS", "text": intro}
            for tag, text in items:
                long = re.search(r"--[a-z0-9][a-z0-9.-]*", tag)
                option = long.group(0) if long else tag.split()[0]
                yield {"_id": ids(f"cli:{option}"), "title": f"curl {tag}", "text": text}
        elif heading == "EXIT CODES":
            yield {"_id": "curl.1#EXIT-CODES", "title": "curl(1) EXIT CODES", "text": intro}
            for tag, text in items:
                yield {
                    "_id": ids(f"curl.1#EXIT-CODES-{slug(tag)}"),
                    "title": f"curl(1) EXIT CODES: {tag}",
                    "text": f"{tag}: {text}",
                }
        else:
            yield {
                "_id": ids(f"curl.1#{key}"),
                "title": f"curl(1) {heading}",
                "text": section_text(intro, items),
            }


def man3(root: Path):
    for path in sorted((root / "usr/share/man/man3").glob("*.3.gz")):
        source = read(path)
        if source.lstrip().startswith(".so "):
            continue
        name, sections = roff(source)
        name = name or path.name.removesuffix(".3.gz")
        summary = next((intro for h, intro, _ in sections if h == "NAME"), name)
        body = [(h, intro, items) for h, intro, items in sections if h != "NAME"]
        base = f"man3:{name}"
        if name == "libcurl-errors":
            ids = Ids()
            for heading, intro, items in body:
                if intro:
                    yield {
                        "_id": ids(f"{base}#{slug(heading)}"),
                        "title": f"{summary}: {heading}",
                        "text": intro,
                    }
                for tag, text in items:
                    yield {
                        "_id": ids(f"{base}#{slug(tag.split()[0])}"),
                        "title": f"libcurl error {tag}",
                        "text": f"{tag}\n{text}",
                    }
        elif name in SPLIT_MAN3:
            ids = Ids()
            for heading, intro, items in body:
                yield {
                    "_id": ids(f"{base}#{slug(heading)}"),
                    "title": f"{summary}: {heading}",
                    "text": section_text(intro, items),
                }
        else:
            text = "\n\n".join(f"{h}\n{section_text(intro, items)}" for h, intro, items in body)
            yield {"_id": base, "title": summary, "text": text}


_MD_HEADING = re.compile(r"^(#{1,4})\s+(.*?)\s*#*\s*$")
_NUMBERED = re.compile(r"^\s{0,3}(\d+)\.(\d+)?\s+(\S.*?)\s*$")


def markdown_sections(text: str):
    """(heading path, text) for each heading's own text; code blocks are not split."""
    path: list[str] = []
    lines: list[str] = []
    fenced = False
    for line in [*text.splitlines(), "# "]:
        if line.startswith(("~~~", "```")):
            fenced = not fenced
        match = None if fenced else _MD_HEADING.match(line)
        if match:
            body = "\n".join(lines).strip()
            if body:
                yield list(path), body
            lines.clear()
            depth = len(match.group(1))
            path[depth - 1 :] = [match.group(2).strip("`")]
        else:
            lines.append(line)


def numbered_sections(text: str):
    """FAQ, KNOWN_BUGS and TODO: '1. Group' and '1.2 Item' headings after a table of
    contents that lists the same headings; yields (number, heading path, text)."""
    lines = text.splitlines()
    headings = [(i, m) for i, line in enumerate(lines) if (m := _NUMBERED.match(line))]
    first = headings[0][1].group(3)
    start = next(i for i, m in headings[1:] if m.group(3) == first)
    # Wrapped text can start with a number too: an item heading must be listed in the
    # table of contents, a group heading must start the line.
    listed = {(m.group(1), m.group(2), m.group(3).lower()) for i, m in headings if i < start}
    group, number, title, body = "", "", "", []
    for line in [*lines[start:], "0. end"]:
        match = _NUMBERED.match(line)
        if match and (
            (match.group(2) is None and not line[0].isspace())
            or (match.group(1), match.group(2), match.group(3).lower()) in listed
        ):
            if number and "\n".join(body).strip():
                yield number, [group, title], "\n".join(body).strip()
            body = []
            if match.group(2) is None:
                group, number, title = match.group(3), "", ""
            else:
                number, title = f"{match.group(1)}.{match.group(2)}", match.group(3)
        else:
            body.append(line)


def docs(root: Path):
    folder = root / "usr/share/doc/libcurl4"
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        name = path.name.removesuffix(".gz")
        if name in SKIP_DOCS:
            continue
        text = read(path)
        stem = name.removesuffix(".md")
        ids = Ids()
        if name.endswith(".md"):
            text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
            for headings, body in markdown_sections(text):
                heading = " > ".join(headings) if headings else stem
                key = slug(headings[-1]) if headings else "top"
                yield {"_id": ids(f"doc:{stem}#{key}"), "title": heading, "text": body}
        elif name in ("FAQ", "KNOWN_BUGS", "TODO"):
            label = {"FAQ": "curl FAQ", "KNOWN_BUGS": "curl known bugs", "TODO": "curl TODO"}
            for number, (group, title), body in numbered_sections(text):
                yield {
                    "_id": ids(f"doc:{stem}#{number}"),
                    "title": f"{label[name]} > {group} > {number} {title}",
                    "text": body,
                }


def changelog(root: Path):
    text = read(root / "usr/share/doc/curl/changelog.gz")
    version, author, count = None, "", 0
    entry: list[str] = []

    def flush():
        body = "\n".join(entry).strip()
        entry.clear()
        if version in CHANGELOG_VERSIONS and body:
            subject = body.partition("\n")[0]
            return {
                "_id": f"changes:{version}#{count}",
                "title": f"curl {version} changelog: {author}: {subject[2:].strip()}",
                "text": body,
            }
        return None

    for line in text.splitlines():
        release = re.match(r"^Version (\S+) \((.*)\)", line)
        by = re.match(r"^(\S.*) \((\d+ \w+ \d{4})\)$", line)
        if release or by or line.startswith("- "):
            if (doc := flush()) is not None:
                yield doc
            if release:
                version, count = release.group(1), 0
            elif by:
                author = line
            else:
                count += 1
                entry.append(line)
        elif entry:
            entry.append(line)
    if (doc := flush()) is not None:
        yield doc


def documents(root: Path):
    yield from curl_1(root)
    yield from man3(root)
    yield from docs(root)
    yield from changelog(root)


def main(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with (out / "corpus.jsonl").open("w") as f:
        for doc in documents(root):
            for n, text in enumerate(cut(doc["text"]), start=1):
                entry = {**doc, "_id": doc["_id"] if n == 1 else f"{doc['_id']}~{n}", "text": text}
                if entry["_id"] in seen or len(text) < MIN_CHARS:
                    continue
                seen.add(entry["_id"])
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    print(f"{len(seen)} passages")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
