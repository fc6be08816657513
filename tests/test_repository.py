"""Facts about the repository that other tests and the local stack rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC_SCHEMA = ROOT.parent / "shared" / "spec" / "schema.sql"


@pytest.mark.skipif(not SPEC_SCHEMA.exists(), reason="the product spec is not beside this checkout")
def test_schema_copy_matches_the_spec():
    """deploy/sql/schema.sql is a copy so that a clone works on its own; it must not drift."""
    assert (ROOT / "deploy" / "sql" / "schema.sql").read_text() == SPEC_SCHEMA.read_text()
