"""Real-world files that used to fail or lose text, built here and sent through the
service: AES-encrypted PDFs, a document holding one enormous unbroken token, DOCX files
with text boxes, equations, content controls, fields and nested tables, footnotes, endnotes
and symbols, and Strict OOXML.
Parsing does not depend on the database, so these run on SQLite only."""

import io
import zipfile
from pathlib import Path

import grpc
import pytest

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2
from services.ingest.parsers import DOCX, parse

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")
FAILED = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_FAILED")
CHUNK_TOKENS = 64  # conftest's make_settings


def _encrypted_pdf(samples, text: str, algorithm: str, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(samples.pdf([text]))))
    writer.encrypt(user_password=user_password, owner_password="x", algorithm=algorithm)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


async def _text(client, document_id: str) -> str:
    return (await client.call("GetDocumentText", document_id=document_id)).text


async def _chunks(client, document_id: str) -> list:
    chunks, token = [], ""
    while True:
        reply = await client.call(
            "ListChunks", document_id=document_id, page_size=1000, page_token=token
        )
        chunks.extend(reply.chunks)
        token = reply.next_page_token
        if not token:
            return chunks


@pytest.mark.parametrize("algorithm", ["AES-256", "AES-256-R5", "AES-128"])
async def test_pdfs_encrypted_with_an_empty_user_password_are_read(client, samples, algorithm):
    data = _encrypted_pdf(samples, f"Quarterly figures protected with {algorithm}.", algorithm, "")
    document = await client.ingest("protected.pdf", data)
    assert document.status == READY, document.error
    assert f"Quarterly figures protected with {algorithm}." in await _text(client, document.id)


async def test_an_aes_pdf_with_a_user_password_fails_with_the_reason(client, samples):
    data = _encrypted_pdf(samples, "Nobody reads this.", "AES-256", "hunter2")
    document = await client.ingest("locked.pdf", data)
    assert document.status == FAILED
    assert "password-protected: password required" in document.error


async def test_one_enormous_unbroken_token_is_split_to_fit_the_embed_limits(client, embed_server):
    async with grpc.aio.insecure_channel(embed_server) as channel:
        info = await embed_pb2_grpc.EmbedServiceStub(channel).GetModelInfo(
            embed_pb2.GetModelInfoRequest()
        )
    prose = " ".join(f"Sentence {n} explains how the archive below was made." for n in range(40))
    # Hex is one word the tokenizer does not know: it saw 300,000 characters as 3 tokens.
    blob = bytes(range(256)).hex() * 586
    assert len(blob) > 3 * info.max_chars_per_text
    data = f"{prose}\n\n{blob}\n\n{prose}".encode()
    document = await client.ingest("dump.txt", data)
    assert document.status == READY, document.error

    text = await _text(client, document.id)
    chunks = await _chunks(client, document.id)
    covered = bytearray(len(text))
    for chunk in chunks:
        assert chunk.text == text[chunk.start_char : chunk.end_char]
        assert len(chunk.text) <= info.max_chars_per_text
        assert 0 < chunk.token_count <= CHUNK_TOKENS
        covered[chunk.start_char : chunk.end_char] = b"\x01" * len(chunk.text)
    assert all(covered[n] or text[n].isspace() for n in range(len(text)))

    # The prose around the blob still ends its chunks at sentences, starts them at words.
    blob_start, blob_end = text.index(blob), text.index(blob) + len(blob)
    around = [c for c in chunks if c.end_char <= blob_start or c.start_char >= blob_end]
    assert len(around) >= 4
    for chunk in around:
        assert chunk.start_char in (0, blob_end + 2) or text[chunk.start_char - 1] == " "
        assert text[chunk.end_char - 1] == "."


W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
NAMESPACES = (
    f'xmlns:w="{W}" '
    'xmlns:m="http://schemas.openxmlformats.org/officeDocument/2006/math" '
    'xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006" '
    'xmlns:wps="http://schemas.microsoft.com/office/word/2010/wordprocessingShape" '
    'xmlns:wp="http://schemas.openxmlformats.org/drawingml/2006/wordprocessingDrawing" '
    'xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main" '
    'xmlns:v="urn:schemas-microsoft-com:vml"'
)


def _box(text: str) -> str:
    return f"<w:txbxContent><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:txbxContent>"


# Word writes a text box twice: as a DrawingML shape, and as VML for older readers.
TEXT_BOX = f"""<w:p {NAMESPACES}><w:r><mc:AlternateContent>
<mc:Choice Requires="wps"><w:drawing><wp:anchor><wp:docPr id="1" name="Text Box 1"/>
<a:graphic><a:graphicData uri="http://schemas.microsoft.com/office/word/2010/wordprocessingShape">
<wps:wsp><wps:txbx>{_box("Boxed note about nightly backups.")}</wps:txbx></wps:wsp>
</a:graphicData></a:graphic></wp:anchor></w:drawing></mc:Choice>
<mc:Fallback><w:pict><v:shape><v:textbox>{_box("Boxed note about nightly backups.")}</v:textbox>
</v:shape></w:pict></mc:Fallback></mc:AlternateContent></w:r>
<w:r><w:t>The anchor paragraph of the box.</w:t></w:r></w:p>"""
VML_BOX = f"""<w:p {NAMESPACES}><w:r><w:pict><v:shape><v:textbox>{_box("Old VML sidebar text.")}
</v:textbox></v:shape></w:pict></w:r></w:p>"""
EQUATION = f"""<w:p {NAMESPACES}><w:r><w:t xml:space="preserve">The energy is </w:t></w:r>
<m:oMath><m:r><m:t>E</m:t></m:r><m:r><m:t>=</m:t></m:r><m:r><m:t>m</m:t></m:r>
<m:sSup><m:e><m:r><m:t>c</m:t></m:r></m:e><m:sup><m:r><m:t>2</m:t></m:r></m:sup></m:sSup></m:oMath>
<w:r><w:t xml:space="preserve"> in the lecture.</w:t></w:r></w:p>"""
CONTENT_CONTROL = f"""<w:sdt {NAMESPACES}><w:sdtPr><w:alias w:val="Client"/></w:sdtPr>
<w:sdtContent><w:p><w:r><w:t>Client name: Contoso Limited.</w:t></w:r></w:p></w:sdtContent>
</w:sdt>"""
FIELDS_AND_LINKS = f"""<w:p {NAMESPACES}><w:r><w:t xml:space="preserve">See </w:t></w:r>
<w:hyperlink w:anchor="top"><w:r><w:t>the operations manual</w:t></w:r></w:hyperlink>
<w:r><w:t xml:space="preserve"> on page </w:t></w:r><w:r><w:fldChar w:fldCharType="begin"/></w:r>
<w:r><w:instrText xml:space="preserve"> PAGEREF secret_bookmark </w:instrText></w:r>
<w:r><w:fldChar w:fldCharType="separate"/></w:r><w:r><w:t>7</w:t></w:r>
<w:r><w:fldChar w:fldCharType="end"/></w:r><w:r><w:t xml:space="preserve">, due </w:t></w:r>
<w:sdt><w:sdtPr/><w:sdtContent><w:r><w:t>1 March</w:t></w:r></w:sdtContent></w:sdt>
<w:r><w:t xml:space="preserve"> by </w:t></w:r>
<w:fldSimple w:instr=" AUTHOR "><w:r><w:t>Ada Lovelace</w:t></w:r></w:fldSimple>
<w:del w:id="1" w:author="x"><w:r><w:delText>withdrawn wording</w:delText></w:r></w:del>
<w:ins w:id="2" w:author="x"><w:r><w:t>.</w:t></w:r></w:ins></w:p>"""


def _rich_docx() -> bytes:
    import docx
    from docx.oxml import parse_xml

    document = docx.Document()
    section = document.sections[0]
    section.header.paragraphs[0].text = "Header of the field report"
    section.footer.paragraphs[0].text = "Footer page marker"
    body = document.element.body

    def raw(xml: str) -> None:
        body.insert(len(body) - 1, parse_xml(xml))  # before the section properties

    document.add_heading("Field report", level=1)
    raw(TEXT_BOX)
    document.add_paragraph("The paragraph after the box.")
    raw(VML_BOX)
    raw(EQUATION)
    raw(CONTENT_CONTROL)
    raw(FIELDS_AND_LINKS)
    document.add_heading("Measurements", level=2)
    table = document.add_table(rows=3, cols=2)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "Merged title cell"
    table.cell(1, 0).text = "Outer cell"
    inner = table.cell(1, 1).add_table(rows=1, cols=2)
    inner.cell(0, 0).text = "Inner left"
    inner.cell(0, 1).text = "Inner right"
    table.cell(2, 0).text = "Last row"
    table.cell(2, 1).add_paragraph("second paragraph of a cell")
    document.add_paragraph("Closing words of the report.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


READING_ORDER = [
    "Header of the field report",
    "Field report",
    "The anchor paragraph of the box.",
    "Boxed note about nightly backups.",
    "The paragraph after the box.",
    "Old VML sidebar text.",
    "The energy is E=m c 2 in the lecture.",
    "Client name: Contoso Limited.",
    "See the operations manual on page 7, due 1 March by Ada Lovelace.",
    "Measurements",
    "Merged title cell",
    "Outer cell | Inner left | Inner right",
    "Last row | second paragraph of a cell",
    "Closing words of the report.",
    "Footer page marker",
]


def _assert_reads_everything_once_in_order(text: str) -> None:
    positions = [text.find(piece) for piece in READING_ORDER]
    assert all(position >= 0 for position in positions), [
        piece for piece, position in zip(READING_ORDER, positions, strict=True) if position < 0
    ]
    assert positions == sorted(positions)
    for piece in READING_ORDER:
        assert text.count(piece) == 1, piece
    for hidden in ("withdrawn wording", "PAGEREF", "secret_bookmark"):
        assert hidden not in text


def _assert_headings(data: bytes, folder: Path) -> None:
    """Heading levels come from the styles part: the parsed spans carry the heading path."""
    path = folder / "headings.docx"
    path.write_bytes(data)
    parsed = parse(path, DOCX, max_docx_bytes=10 * 1024 * 1024, max_chars=1_000_000)
    levels = {
        parsed.text[span.start : span.end]: (span.level, span.heading) for span in parsed.spans
    }
    assert levels["Field report"] == (1, "Field report")
    assert levels["Measurements"] == (2, "Field report > Measurements")
    assert levels["Closing words of the report."] == (0, "Field report > Measurements")


async def test_docx_text_wherever_it_sits_is_read_once_in_reading_order(client, tmp_path):
    data = _rich_docx()
    document = await client.ingest("report.docx", data)
    assert document.status == READY, document.error
    _assert_reads_everything_once_in_order(await _text(client, document.id))
    _assert_headings(data, tmp_path)


STRICT = {
    W.encode(): b"http://purl.oclc.org/ooxml/wordprocessingml/main",
    b"http://schemas.openxmlformats.org/officeDocument/2006/relationships": (
        b"http://purl.oclc.org/ooxml/officeDocument/relationships"
    ),
    b"http://schemas.openxmlformats.org/officeDocument/2006/math": (
        b"http://purl.oclc.org/ooxml/officeDocument/math"
    ),
}


def _strict(data: bytes) -> bytes:
    """The same document in ISO 29500 Strict namespaces, as Word's "Strict Open XML" saves."""
    source = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith((".xml", ".rels")):
                for transitional, strict in STRICT.items():
                    content = content.replace(transitional, strict)
                content = content.replace(b"<w:document ", b'<w:document w:conformance="strict" ')
            target.writestr(info, content)
    return buffer.getvalue()


async def test_strict_ooxml_docx_is_read(client, tmp_path):
    data = _strict(_rich_docx())
    assert b"purl.oclc.org/ooxml/wordprocessingml/main" in zipfile.ZipFile(io.BytesIO(data)).read(
        "word/document.xml"
    )
    document = await client.ingest("strict.docx", data)
    assert document.status == READY, document.error
    _assert_reads_everything_once_in_order(await _text(client, document.id))
    _assert_headings(data, tmp_path)


async def test_docx_whose_document_part_is_not_xml_fails_with_the_part_named(client, samples):
    data = samples.docx_with_part("word/document.xml", b"<w:document><w:body>", base=samples.docx())
    document = await client.ingest("broken.docx", data)
    assert document.status == FAILED
    assert "word/document.xml is not well-formed XML" in document.error


def _note(kind: str, number: int, text: str, note_type: str = "") -> str:
    typed = f' w:type="{note_type}"' if note_type else ""
    return (
        f'<w:{kind}{typed} w:id="{number}"><w:p><w:r><w:{kind}Ref/></w:r>'
        f'<w:r><w:t xml:space="preserve"> {text}</w:t></w:r></w:p></w:{kind}>'
    )


def _notes_part(kind: str, notes: list[str]) -> bytes:
    separators = (
        f'<w:{kind} w:type="separator" w:id="-1"><w:p><w:r><w:separator/></w:r></w:p></w:{kind}>'
        f'<w:{kind} w:type="continuationSeparator" w:id="0"><w:p><w:r>'
        f"<w:continuationSeparator/></w:r></w:p></w:{kind}>"
    )
    return f'<w:{kind}s xmlns:w="{W}">{separators}{"".join(notes)}</w:{kind}s>'.encode()


SYMBOLS = f"""<w:p {NAMESPACES}><w:r><w:t xml:space="preserve">Keep </w:t></w:r>
<w:r><w:sym w:font="Symbol" w:char="F0B3"/></w:r>
<w:r><w:t xml:space="preserve"> 3 copies; the factor </w:t></w:r>
<w:r><w:sym w:font="Symbol" w:char="F061"/></w:r><w:r><w:t xml:space="preserve"> is 0.5 </w:t></w:r>
<w:r><w:sym w:font="Arial" w:char="2192"/></w:r><w:r><w:t xml:space="preserve"> done</w:t></w:r>
<w:r><w:sym w:font="Wingdings" w:char="F0FC"/></w:r><w:r><w:sym w:font="Symbol" w:char="zz"/></w:r>
<w:r><w:t>.</w:t></w:r></w:p>"""
REFERENCES = f"""<w:p {NAMESPACES}><w:r><w:t>Backups run nightly</w:t></w:r>
<w:r><w:footnoteReference w:id="1"/></w:r><w:r><w:t xml:space="preserve"> and restores weekly</w:t>
</w:r><w:r><w:footnoteReference w:id="2"/></w:r><w:r><w:t>.</w:t></w:r>
<w:r><w:endnoteReference w:id="1"/></w:r></w:p>"""


def _docx_with_notes() -> bytes:
    import docx
    from docx.oxml import parse_xml

    document = docx.Document()
    document.sections[0].footer.paragraphs[0].text = "Footer page marker"
    body = document.element.body
    document.add_paragraph("Opening paragraph.")
    for xml in (REFERENCES, SYMBOLS):
        body.insert(len(body) - 1, parse_xml(xml))
    document.add_paragraph("Closing paragraph.")
    buffer = io.BytesIO()
    document.save(buffer)
    parts = {
        "word/footnotes.xml": _notes_part(
            "footnote",
            [
                _note("footnote", 1, "Copies are kept for 30 days."),
                _note("footnote", 2, "Restores are rehearsed on a spare host."),
                _note("footnote", -2, "Continued on the next page", "continuationNotice"),
            ],
        ),
        "word/endnotes.xml": _notes_part("endnote", [_note("endnote", 1, "See the runbook.")]),
    }
    relationships = "".join(
        f'<Relationship Id="rIdNotes{kind}" Target="{kind}s.xml" Type="http://schemas.'
        f'openxmlformats.org/officeDocument/2006/relationships/{kind}s"/>'
        for kind in ("footnote", "endnote")
    ).encode()
    overrides = "".join(
        f'<Override PartName="/word/{kind}s.xml" ContentType="application/vnd.openxmlformats-'
        f'officedocument.wordprocessingml.{kind}s+xml"/>'
        for kind in ("footnote", "endnote")
    ).encode()
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == "word/_rels/document.xml.rels":
                content = content.replace(b"</Relationships>", relationships + b"</Relationships>")
            elif info.filename == "[Content_Types].xml":
                content = content.replace(b"</Types>", overrides + b"</Types>")
            target.writestr(info, content)
        for name, content in parts.items():
            target.writestr(name, content)
    return out.getvalue()


async def test_docx_footnotes_endnotes_and_symbols_are_read(client):
    document = await client.ingest("notes.docx", _docx_with_notes())
    assert document.status == READY, document.error
    text = await _text(client, document.id)
    order = [
        "Opening paragraph.",
        "Backups run nightly and restores weekly.",
        "Keep \u2265 3 copies; the factor \u03b1 is 0.5 \u2192 done.",
        "Closing paragraph.",
        "Copies are kept for 30 days.",
        "Restores are rehearsed on a spare host.",
        "See the runbook.",
        "Footer page marker",
    ]
    positions = [text.find(piece) for piece in order]
    assert -1 not in positions, [p for p, at in zip(order, positions, strict=True) if at < 0]
    assert positions == sorted(positions)
    assert "Continued on the next page" not in text
