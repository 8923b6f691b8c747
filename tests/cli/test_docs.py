"""ragmesh docs against the real mesh: uploads with their progress, reading a document
back, search with per-channel scores and highlighted words, deletion."""

import re

TIDES = """# Tide tables

The harbour master at Vik publishes the tide tables every Sunday. Spring tides follow the
full and the new moon; neap tides fall between them, when the range is smallest.

## Reading a table

Each row gives the time and the height of high and low water. Heights are in metres above
chart datum, the lowest astronomical tide, so a negative height means the sea falls below
the charted depths.
"""
STATES = ["PENDING", "PARSING", "CHUNKING", "EMBEDDING", "READY"]


async def test_upload_shows_the_bytes_sent_then_each_processing_state(cli, tmp_path):
    path = tmp_path / "tides.md"
    path.write_text(TIDES * 40)
    terminal = await cli.terminal("docs", "upload", str(path))
    await terminal.expect(r"READY · \d+ chunks")
    assert await terminal.exit_code() == 0
    # Each redraw of the row follows the last on the screen, escape sequences left out.
    screen = terminal.screen
    # The bar ends with every byte sent, the document's id beside it.
    done, total = re.findall(r"([\d.]+)/([\d.]+) KiB", screen)[-1]
    assert done == total == f"{path.stat().st_size / 1024:.1f}"
    assert re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", screen)
    # States shown as they came, in processing order (a short one may pass unseen).
    shown = re.findall("|".join(STATES), screen)
    changes = [state for i, state in enumerate(shown) if i == 0 or shown[i - 1] != state]
    assert changes == sorted(changes, key=STATES.index)
    assert changes[-1] == "READY"


async def test_upload_a_folder_for_scripts_then_list_it(cli, tmp_path):
    folder = tmp_path / "notes"
    (folder / "winter").mkdir(parents=True)
    (folder / "moon.md").write_text("The moon pulls the sea into two bulges, one on each side.")
    (folder / "winter" / "ice.txt").write_text("Drift ice closes the northern harbour in March.")
    (folder / ".draft.md").write_text("Hidden files stay out of an upload.")

    run = await cli("docs", "upload", str(folder), "--tag", "field-notes", "--json")
    assert run.code == 0, run.err
    uploads = run.json()
    assert sorted(upload["document"]["filename"] for upload in uploads) == [
        "moon.md",
        "winter/ice.txt",
    ]
    for upload in uploads:
        assert upload["document"]["status"] == "DOCUMENT_STATUS_READY"
        assert upload["document"]["chunkCount"] >= 1
        assert upload["document"]["tags"] == ["field-notes"]
        assert upload["duplicate"] is False

    listed = (await cli("docs", "list", "--tag", "field-notes", "--json")).json()["documents"]
    assert {d["id"] for d in listed} == {upload["document"]["id"] for upload in uploads}
    table = await cli("docs", "list", "--status", "ready")
    assert "winter/ice.txt" in table.out and "moon.md" in table.out

    again = await cli("docs", "upload", str(folder / "moon.md"))
    assert again.code == 0, again.err
    assert "already stored" in again.out


async def test_a_file_the_service_refuses_fails_alone(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "buoys.txt").write_text("Red buoys mark the port side of the channel.")
    run = await cli("docs", "upload", str(tmp_path / "empty.txt"), str(tmp_path / "buoys.txt"))
    assert run.code == 1
    assert run.err.startswith("error: 1 of 2 documents failed (empty.txt: ")
    assert run.err.count("\n") == 1
    assert "REFUSED" in run.out
    assert re.search(r"buoys\.txt .* READY · 1 chunks", run.out)


async def test_a_document_reads_back_whole_and_in_chunks(cli, lighthouse):
    shown = await cli("docs", "show", lighthouse)
    assert shown.code == 0, shown.err
    assert "skerry-light.md" in shown.out and "READY" in shown.out
    document = (await cli("docs", "show", lighthouse, "--json")).json()
    assert document["id"] == lighthouse
    assert document["mimeType"] == "text/markdown"

    text = await cli("docs", "text", lighthouse)
    assert "Ada Lund keeps the lighthouse on Skerry Rock." in text.out
    as_json = (await cli("docs", "text", lighthouse, "--json")).json()
    assert as_json["text"] == text.out
    assert int(as_json["totalChars"]) == len(text.out)

    chunks = (await cli("docs", "chunks", lighthouse, "--json")).json()["chunks"]
    assert [chunk["index"] for chunk in chunks] == list(range(len(chunks)))
    assert len(chunks) == document["chunkCount"] > 1
    listing = await cli("docs", "chunks", lighthouse)
    assert "#0" in listing.out and "The Skerry Light > Storms" in listing.out


async def test_search_shows_each_channel_and_highlights_the_matched_words(cli, lighthouse):
    hybrid = await cli("docs", "search", "lighthouse keepers", "--doc", lighthouse)
    assert hybrid.code == 0, hybrid.err
    assert "KEYWORD" in hybrid.out and "SEMANTIC" in hybrid.out
    assert "skerry-light.md #0" in hybrid.out

    keyword = await cli("docs", "search", "storms", "--mode", "keyword", "--doc", lighthouse)
    assert "KEYWORD" in keyword.out and "SEMANTIC" not in keyword.out
    assert "skerry-light.md #2" in keyword.out

    hits = (await cli("docs", "search", "keepers", "--doc", lighthouse, "--json")).json()
    assert hits["mode"] == "SEARCH_MODE_HYBRID"
    assert hits["hits"][0]["documentId"] == lighthouse
    assert "keepers" in hits["hits"][0]["matchedTerms"]

    # In colour, the words that matched stand out, compared by stem as the search does:
    # "keepers" matches "keeper", not "keeps" (stem "keep").
    coloured = await cli("docs", "search", "keepers", "--doc", lighthouse, env={"FORCE_COLOR": "1"})
    highlighted = set(re.findall(r"\x1b\[[0-9;]+m(\w+)\x1b\[0m", coloured.out))
    assert "keeper" in highlighted
    assert not {"keeps", "lighthouse"} & highlighted


async def test_rm_deletes_a_document_and_its_id_is_gone(cli, tmp_path):
    path = tmp_path / "gulls.txt"
    path.write_text("Herring gulls nest on the gallery rail every spring.")
    upload = (await cli("docs", "upload", str(path), "--json")).json()[0]
    document_id = upload["document"]["id"]

    removed = await cli("docs", "rm", document_id)
    assert removed.code == 0, removed.err
    assert f"deleted {document_id}" in removed.out

    for args in (["docs", "show", document_id], ["docs", "rm", document_id]):
        gone = await cli(*args)
        assert gone.code == 1
        assert gone.err == f"error: document {document_id!r} does not exist\n"
