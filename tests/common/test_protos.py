"""The committed Python stubs match the protos."""

from pathlib import Path

from services.common.protogen import generate

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_current(tmp_path):
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "no stubs generated"
    stale = [str(p) for p in generated if (REPO / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert stale == [], f"stubs out of date, run `make proto`: {stale}"
