"""Recognises uploaded files by their bytes and turns them into text blocks with structure."""

import codecs
import logging
import posixpath
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import charset_normalizer

_LOGGER = logging.getLogger(__name__)

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
SUPPORTED = (PDF, DOCX, HTML, MARKDOWN, TEXT)

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_HTML_START = re.compile(rb"^\s*(<!doctype\s+html|<html|<head|<body|<!--)", re.IGNORECASE)
_MARKDOWN_NAMES = (".md", ".markdown", ".mdown", ".mkd")
_HTML_NAMES = (".html", ".htm", ".xhtml")
# Word never writes a DTD; one in a DOCX part is an entity-expansion attack.
_DTD_MARKERS = (b"<!DOCTYPE", b"<!ENTITY")
_DOCX_PROLOG_BYTES = 64 * 1024


class ParseError(Exception):
    """The file cannot be turned into text; the message tells a person why."""


@dataclass
class Block:
    """A paragraph, heading, table or list item, in reading order."""

    text: str
    page: int = 0
    # Heading level 1-6 when the block is a heading, else 0.
    level: int = 0


@dataclass
class Span:
    start: int
    end: int
    page: int
    level: int
    # The heading path that applies to this block, for example "Setup > Install".
    heading: str


@dataclass
class ParsedDocument:
    text: str
    page_count: int = 0
    spans: list[Span] = field(default_factory=list)


def sniff(head: bytes, path: Path, filename: str, hint: str) -> str | None:
    """The MIME type of an upload from its first bytes; the name and hint only break ties."""
    name = filename.lower()
    if head.startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return PDF
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError):
            # A truncated DOCX is still a DOCX; parsing says what is wrong with it.
            return DOCX if name.endswith(".docx") or hint == DOCX else None
        return DOCX if "word/document.xml" in names else None
    if not _looks_like_text(head):
        return None
    stripped = _strip_bom(head)
    if _HTML_START.match(stripped) or (
        (hint == HTML or name.endswith(_HTML_NAMES)) and stripped.lstrip().startswith(b"<")
    ):
        return HTML
    if hint == MARKDOWN or name.endswith(_MARKDOWN_NAMES):
        return MARKDOWN
    return TEXT


def _strip_bom(head: bytes) -> bytes:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            try:
                return codecs.getincrementaldecoder(encoding)().decode(head).encode()
            except UnicodeDecodeError:
                return head[len(bom) :]
    return head


def _looks_like_text(head: bytes) -> bool:
    if any(head.startswith(bom) for bom, _ in _BOMS):
        return True
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return True
    except UnicodeDecodeError:
        return charset_normalizer.from_bytes(head).best() is not None


def decode_text(data: bytes) -> str:
    """Text in its own encoding: a BOM first, then UTF-8, then a detected one."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        matches = charset_normalizer.from_bytes(data)
        best = matches.best()
        if best is None:
            return data.decode("utf-8", errors="replace")
        # Detection cannot tell Western cp1252 from its Central European and Baltic cousins
        # on accented Latin text; cp1252 is by far the likeliest legacy upload, so it wins
        # when it reads about as cleanly.
        for match in matches:
            if match.encoding == "cp1252" and match.chaos <= best.chaos + 0.05:
                return str(match)
        return str(best)


def parse(path: Path, mime_type: str, *, max_docx_bytes: int, max_chars: int) -> ParsedDocument:
    """Parses a stored upload; blocking, so the service runs it in a child process
    (parse_process). Raises ParseError; running out of memory comes out as MemoryError or
    as the cause of a ParseError."""
    try:
        if mime_type == PDF:
            blocks, pages = _parse_pdf(path)
        elif mime_type == DOCX:
            blocks, pages = _parse_docx(path, max_docx_bytes), 0
        elif mime_type == HTML:
            blocks, pages = _parse_html(path.read_bytes()), 0
        elif mime_type == MARKDOWN:
            blocks, pages = _parse_markdown(decode_text(path.read_bytes())), 0
        elif mime_type == TEXT:
            blocks, pages = _paragraphs(decode_text(path.read_bytes())), 0
        else:
            raise ParseError(f"unsupported type {mime_type}")
    except ParseError:
        raise
    except RecursionError as exc:
        raise ParseError("the file is nested too deeply to parse") from exc
    except Exception as exc:
        # Parsers of hostile files fail in many ways; the person needs the kind, not a trace.
        _LOGGER.info("parsing %s as %s failed", path.name, mime_type, exc_info=True)
        raise ParseError(f"the file could not be read as {mime_type}: {exc}") from exc
    document = assemble(blocks, pages)
    if not document.text.strip():
        raise ParseError(_no_text_reason(mime_type))
    if len(document.text) > max_chars:
        raise ParseError(
            f"the parsed text has {len(document.text)} characters, over the limit of {max_chars}"
        )
    return document


def _no_text_reason(mime_type: str) -> str:
    if mime_type == PDF:
        return "no text found in the PDF (a scan without a text layer? run OCR first)"
    return "no text found in the file"


def assemble(blocks: list[Block], page_count: int) -> ParsedDocument:
    """Joins blocks with blank lines, remembering each block's offsets and heading path."""
    parts: list[str] = []
    spans: list[Span] = []
    headings: list[tuple[int, str]] = []
    offset = 0
    for block in blocks:
        text = block.text.strip()
        if not text:
            continue
        if block.level:
            while headings and headings[-1][0] >= block.level:
                headings.pop()
            headings.append((block.level, " ".join(text.split())))
        if parts:
            parts.append("\n\n")
            offset += 2
        parts.append(text)
        path = " > ".join(title for _, title in headings)
        spans.append(Span(offset, offset + len(text), block.page, block.level, path))
        offset += len(text)
    return ParsedDocument("".join(parts), page_count, spans)


def _paragraphs(text: str, page: int = 0) -> list[Block]:
    return [Block(part, page) for part in re.split(r"\n\s*\n", text) if part.strip()]


# PDF


def _parse_pdf(path: Path) -> tuple[list[Block], int]:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError) as exc:
                raise ParseError(f"the PDF uses unsupported encryption: {exc}") from exc
            if opened == PasswordType.NOT_DECRYPTED:
                raise ParseError(
                    "the PDF is password-protected: password required; "
                    "upload a copy without a password"
                )
        blocks: list[Block] = []
        pages = reader.pages
        for number, page in enumerate(pages, start=1):
            blocks.extend(_paragraphs(page.extract_text() or "", number))
        return blocks, len(pages)
    except FileNotDecryptedError as exc:
        raise ParseError("the PDF is password-protected: password required") from exc
    except PdfReadError as exc:
        raise ParseError(f"not a readable PDF (corrupt or truncated): {exc}") from exc


# DOCX


def check_docx(path: Path, max_bytes: int) -> None:
    """Refuses archives that expand past the cap or carry DTDs, before python-docx sees them."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ParseError("not a valid DOCX file: it is not a readable zip archive") from exc
    with archive:
        infos = archive.infolist()
        expanded = sum(info.file_size for info in infos)
        if expanded > max_bytes:
            raise ParseError(
                f"the DOCX expands to {expanded} bytes, over the limit of {max_bytes} (a zip bomb?)"
            )
        if "word/document.xml" not in {info.filename for info in infos}:
            raise ParseError("not a valid DOCX file: word/document.xml is missing")
        for info in infos:
            if info.filename.endswith((".xml", ".rels")):
                with archive.open(info) as part:
                    prolog = part.read(_DOCX_PROLOG_BYTES)
                if any(marker in prolog for marker in _DTD_MARKERS):
                    raise ParseError(
                        f"the DOCX part {info.filename} declares a DTD or entities, which Word "
                        "never writes (an entity-expansion attack?)"
                    )


def _parse_docx(path: Path, max_bytes: int) -> list[Block]:
    """The text of the document part, its headers and footers, footnotes and endnotes, read
    from the XML."""
    check_docx(path, max_bytes)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        root = _docx_xml(archive, _DOCX_MAIN)
        if _kind(root) != ("w", "document"):
            raise ParseError(f"not a valid DOCX file: {_DOCX_MAIN} is not a Word document")
        body = next((child for child in root if _kind(child) == ("w", "body")), None)
        if body is None:
            raise ParseError(f"not a valid DOCX file: {_DOCX_MAIN} has no body")
        targets = _docx_targets(archive, names)
        styles = [part for kind, part in targets.values() if kind == "styles" and part in names]
        reader = _DocxReader(
            lambda: _docx_heading_styles(_docx_xml(archive, styles[0])) if styles else {}
        )
        # Each header and footer once, however many sections refer to it; a section that
        # refers to none shows the previous section's.
        parts: dict[str, list[str]] = {"headerReference": [], "footerReference": []}
        for section in root.iter(*(f"{{{namespace}}}sectPr" for namespace in _WORD)):
            for reference in section:
                kind, local = _kind(reference)
                target = targets.get(_attribute(reference, "id"))
                if kind == "w" and local in parts and target and target[1] in names:
                    if target[1] not in parts[local]:
                        parts[local].append(target[1])

        def read(part_names: list[str]) -> list[Block]:
            return [
                block for name in part_names for block in reader.blocks(_docx_xml(archive, name))
            ]

        notes = [
            block
            for wanted in ("footnotes", "endnotes")
            for kind, part in targets.values()
            if kind == wanted and part in names
            for block in _docx_notes(reader, _docx_xml(archive, part))
        ]
        return [
            *read(parts["headerReference"]),
            *reader.blocks(body),
            *notes,
            *read(parts["footerReference"]),
        ]


def _docx_notes(reader: "_DocxReader", root) -> list[Block]:
    """Footnotes or endnotes in the part's order, which is the order Word numbers them in,
    without the separator lines and continuation notices Word keeps there too."""
    return [
        block
        for note in root
        if _kind(note) in (("w", "footnote"), ("w", "endnote"))
        and _attribute(note, "type") in (None, "normal")
        for block in reader.blocks(note)
    ]


# Word's namespaces, transitional and Strict OOXML (ISO 29500) alike.
_WORD = (
    "http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    "http://purl.oclc.org/ooxml/wordprocessingml/main",
)
_NAMESPACE_KINDS = {
    **dict.fromkeys(_WORD, "w"),
    "http://schemas.openxmlformats.org/officeDocument/2006/math": "m",
    "http://purl.oclc.org/ooxml/officeDocument/math": "m",
    "http://schemas.openxmlformats.org/markup-compatibility/2006": "mc",
}
_DOCX_MAIN = "word/document.xml"
_DOCX_RELATIONSHIPS = "word/_rels/document.xml.rels"
# Not shown on the page: properties, deleted and moved-away text, field codes.
_DOCX_HIDDEN = frozenset(
    ("pPr", "rPr", "tblPr", "trPr", "tcPr", "sdtPr", "sdtEndPr", "sectPr", "del", "delText",
     "moveFrom", "instrText", "delInstrText", "fldData")
)  # fmt: skip
# w:sym characters of the Symbol font (its codes, which Word writes from F000 on) that
# have a Unicode meaning: Greek letters and common signs. Other symbol fonts' glyphs
# (Wingdings arrows, check boxes) have none and are left out.
_SYMBOL_FONT = {
    **dict(zip(range(0x41, 0x5B), map(ord, "ΑΒΧΔΕΦΓΗΙϑΚΛΜΝΟΠΘΡΣΤΥςΩΞΨΖ"), strict=True)),
    **dict(zip(range(0x61, 0x7B), map(ord, "αβχδεφγηιϕκλμνοπθρστυϖωξψζ"), strict=True)),
    # Signs, as Unicode code points.
    0x22: 0x2200, 0x24: 0x2203, 0x27: 0x220B, 0x2A: 0x2217, 0x2D: 0x2212, 0x40: 0x2245,
    0x5E: 0x22A5, 0xA3: 0x2264, 0xA5: 0x221E, 0xAC: 0x2190, 0xAD: 0x2191, 0xAE: 0x2192,
    0xAF: 0x2193, 0xB0: 0x00B0, 0xB1: 0x00B1, 0xB3: 0x2265, 0xB4: 0x00D7, 0xB5: 0x221D,
    0xB6: 0x2202, 0xB7: 0x2022, 0xB8: 0x00F7, 0xB9: 0x2260, 0xBA: 0x2261, 0xBB: 0x2248,
    0xC7: 0x2229, 0xC8: 0x222A, 0xCE: 0x2208, 0xCF: 0x2209, 0xD0: 0x2220, 0xD5: 0x220F,
    0xD6: 0x221A, 0xD7: 0x22C5, 0xDB: 0x21D4, 0xDE: 0x21D2, 0xE5: 0x2211, 0xF2: 0x222B,
}  # fmt: skip
# The parts of an equation (numerator, exponent, ...) that read as separate words.
_MATH_ARGUMENTS = frozenset(("num", "den", "sub", "sup", "deg", "e", "lim", "fName"))


def _kind(element) -> tuple[str, str]:
    """("w", "p") for a Word paragraph in either namespace; ("", name) for others."""
    tag = element.tag
    if not isinstance(tag, str):
        return "", ""  # a comment or processing instruction
    namespace, _, local = tag[1:].rpartition("}") if tag.startswith("{") else ("", "", tag)
    return _NAMESPACE_KINDS.get(namespace, ""), local


def _attribute(element, local: str) -> str | None:
    """An attribute by its local name, whichever namespace (w:val, r:id) it is in."""
    for key, value in element.attrib.items():
        if key.rpartition("}")[2] == local:
            return value
    return None


def _docx_xml(archive: zipfile.ZipFile, name: str):
    from lxml import etree

    # check_docx refused DTDs already; entities and the network stay off regardless.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        return etree.fromstring(archive.read(name), parser)
    except etree.XMLSyntaxError as exc:
        if exc.code == etree.ErrorTypes.ERR_NO_MEMORY:
            raise MemoryError(f"out of memory reading {name}") from exc
        raise ParseError(f"not a valid DOCX file: {name} is not well-formed XML: {exc}") from exc


def _docx_targets(archive: zipfile.ZipFile, names: set[str]) -> dict[str, tuple[str, str]]:
    """The document part's relationships: id -> (type, such as "header", and part name)."""
    if _DOCX_RELATIONSHIPS not in names:
        return {}
    targets = {}
    for relationship in _docx_xml(archive, _DOCX_RELATIONSHIPS):
        target = relationship.get("Target") or ""
        if relationship.get("TargetMode") == "External" or not target:
            continue
        part = target[1:] if target.startswith("/") else posixpath.join("word", target)
        kind = (relationship.get("Type") or "").rpartition("/")[2]
        targets[relationship.get("Id") or ""] = (kind, posixpath.normpath(part))
    return targets


def _docx_heading_styles(styles) -> dict[str, int]:
    """Heading level by paragraph style id: "Heading 1" to "Heading 6", and "Title" as 1."""
    levels = {}
    for name in styles.iter(*(f"{{{namespace}}}name" for namespace in _WORD)):
        style = name.getparent()
        title = (_attribute(name, "val") or "").lower()
        match = re.fullmatch(r"heading (\d)", title)
        level = 1 if title == "title" else min(int(match.group(1)), 6) if match else 0
        if level and _kind(style) == ("w", "style"):
            levels[_attribute(style, "styleId") or ""] = level
    return levels


def _symbol(sym) -> str:
    """The character of a w:sym, or "" for a symbol font's glyph that Unicode lacks."""
    try:
        code = int(_attribute(sym, "char") or "", 16)
    except ValueError:
        return ""
    font = (_attribute(sym, "font") or "").lower()
    if font == "symbol" and (code < 0x100 or 0xF000 <= code <= 0xF0FF):
        code &= 0xFF
        if code in _SYMBOL_FONT:
            return chr(_SYMBOL_FONT[code])
        return chr(code) if 0x20 <= code < 0x7F else ""
    # Unless private use (where symbol fonts keep their glyphs), a surrogate or a control.
    return chr(code) if 0x20 <= code < 0xD800 or 0xF900 <= code <= 0x10FFFF else ""


def _chosen(alternate):
    """One branch of mc:AlternateContent (the first Choice), so text boxes, which Word
    writes both as a shape and as a VML fallback, are read once."""
    return next(
        (child for child in alternate if _kind(child) in (("mc", "Choice"), ("mc", "Fallback"))),
        None,
    )


class _DocxReader:
    """Blocks from Word's XML in reading order: paragraphs, tables (nested ones inside their
    cell), text boxes after the paragraph that anchors them, content controls, fields,
    hyperlinks and equations."""

    def __init__(self, heading_levels: Callable[[], dict[str, int]]) -> None:
        # Read from the styles part at the first paragraph that names a style.
        self._read_levels = heading_levels
        self._levels: dict[str, int] | None = None

    def blocks(self, container) -> list[Block]:
        blocks: list[Block] = []
        for child in container:
            kind, local = _kind(child)
            if kind == "w" and local == "p":
                blocks.extend(self._paragraph(child))
            elif kind == "w" and local == "tbl":
                blocks.append(Block(self._table(child)))
            elif kind == "mc" and local == "AlternateContent":
                chosen = _chosen(child)
                if chosen is not None:
                    blocks.extend(self.blocks(chosen))
            elif local not in _DOCX_HIDDEN:
                # Content controls, custom XML and tracked insertions wrap paragraphs.
                blocks.extend(self.blocks(child))
        return blocks

    def _paragraph(self, paragraph) -> list[Block]:
        parts: list[str] = []
        boxes: list[Block] = []
        self._inline(paragraph, parts, boxes)
        return [Block("".join(parts), level=self._level(paragraph)), *boxes]

    def _level(self, paragraph) -> int:
        for properties in paragraph:
            if _kind(properties) == ("w", "pPr"):
                for style in properties:
                    if _kind(style) == ("w", "pStyle"):
                        if self._levels is None:
                            self._levels = self._read_levels()
                        return self._levels.get(_attribute(style, "val") or "", 0)
        return 0

    def _inline(self, element, parts: list[str], boxes: list[Block]) -> None:
        for child in element:
            kind, local = _kind(child)
            if local in _DOCX_HIDDEN and kind == "w":
                continue
            if kind in ("w", "m") and local == "t":
                parts.append(child.text or "")
            elif kind == "w" and local == "tab":
                parts.append("\t")
            elif kind == "w" and local in ("br", "cr"):
                parts.append("\n")
            elif kind == "w" and local == "noBreakHyphen":
                parts.append("-")
            elif kind == "w" and local == "sym":
                parts.append(_symbol(child))
            elif kind == "w" and local == "txbxContent":
                boxes.extend(self.blocks(child))
            elif kind == "mc" and local == "AlternateContent":
                chosen = _chosen(child)
                if chosen is not None:
                    self._inline(chosen, parts, boxes)
            elif kind == "m" and local == "oMath":
                math: list[str] = []
                self._inline(child, math, boxes)
                parts.append(" ".join("".join(math).split()))
            elif kind == "m" and local in _MATH_ARGUMENTS:
                parts.append(" ")
                self._inline(child, parts, boxes)
                parts.append(" ")
            else:
                # Runs, hyperlinks, fields, smart tags, drawings and shapes hold the text.
                self._inline(child, parts, boxes)

    def _table(self, table) -> str:
        rows = []
        for row in self._items(table, "tr"):
            cells = [
                " ".join(" ".join(block.text for block in self.blocks(cell)).split())
                for cell in self._items(row, "tc")
            ]
            rows.append(" | ".join(cells))
        return "\n".join(rows)

    def _items(self, element, wanted: str):
        """Rows of a table or cells of a row, also those inside content controls."""
        for child in element:
            kind, local = _kind(child)
            if kind == "w" and local == wanted:
                yield child
            elif kind == "w" and local in ("sdt", "sdtContent", "customXml"):
                yield from self._items(child, wanted)
            elif kind == "mc" and local == "AlternateContent":
                chosen = _chosen(child)
                if chosen is not None:
                    yield from self._items(chosen, wanted)


# HTML

_DROPPED_TAGS = ("script", "style", "nav", "noscript", "template", "svg", "head", "iframe")
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "li",
    "main", "ol", "p", "pre", "section", "summary", "table", "tbody", "thead", "tfoot",
    "title", "tr", "ul", *_HEADINGS,
}  # fmt: skip
_CELL_TAGS = {"td", "th"}


def _parse_html(data: bytes) -> list[Block]:
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, ProcessingInstruction, Tag

    soup = BeautifulSoup(data, "lxml")
    for tag in soup.find_all(list(_DROPPED_TAGS)):
        tag.decompose()
    skipped = (Comment, Declaration, Doctype, ProcessingInstruction)
    blocks: list[Block] = []
    words: list[str] = []
    level = 0

    def flush() -> None:
        nonlocal level
        text = " ".join(" ".join(words).split())
        words.clear()
        if text:
            blocks.append(Block(text, level=level))
        level = 0

    # An explicit stack, not recursion: a hostile page nests 100,000 elements deep.
    stack: list[tuple[object, bool]] = [(soup, False)]
    while stack:
        node, leaving = stack.pop()
        if isinstance(node, Tag):
            if node.name in _BLOCK_TAGS:
                flush()
            elif node.name in _CELL_TAGS and leaving:
                words.append(" | ")
            if leaving:
                continue
            if node.name in _HEADINGS:
                level = _HEADINGS[node.name]
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.contents))
        elif not isinstance(node, skipped):
            words.append(str(node))
    flush()
    return [_trim_cells(block) for block in blocks]


def _trim_cells(block: Block) -> Block:
    block.text = block.text.strip(" |").replace("| |", "|")
    return block


# Markdown

# Only the opening: the text and the closing #s are cut off in Python, since a pattern for
# them backtracks cubically on a run of spaces inside a long heading line.
_ATX_HEADING = re.compile(r" {0,3}(#{1,6})\s")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _parse_markdown(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines: list[str] = []
    fence: str | None = None

    def flush() -> None:
        if lines:
            blocks.append(Block("\n".join(lines)))
            lines.clear()

    for line in text.splitlines():
        fence_match = _FENCE.match(line)
        if fence is not None:
            lines.append(line)
            if fence_match and fence_match.group(1) == fence:
                fence = None
                flush()
            continue
        if fence_match:
            flush()
            fence = fence_match.group(1)
            lines.append(line)
            continue
        heading = _ATX_HEADING.match(line)
        if heading:
            flush()
            text = _heading_text(line[heading.end() :])
            blocks.append(Block(text, level=len(heading.group(1))))
        elif not line.strip():
            flush()
        else:
            lines.append(line)
    flush()
    return blocks


def _heading_text(rest: str) -> str:
    """A heading's text without its closing sequence of #s, which stands apart from the text
    ("# C#" is the heading "C#")."""
    text = rest.strip()
    opened = text.rstrip("#")
    return opened.strip() if not opened or opened[-1].isspace() else text
