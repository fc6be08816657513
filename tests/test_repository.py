"""Facts about the repository that other tests and the local stack rely on."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC_SCHEMA = ROOT.parent / "shared" / "spec" / "schema.sql"
# SHA-256 of the product spec's schema.sql that deploy/sql/schema.sql copies. The spec lies
# beside a developer's checkout, not in a clone (CI's): the copy is checked against this pin
# everywhere, and the pin against the spec wherever the spec is there.
SPEC_SCHEMA_SHA256 = "804e33a78d6dffb774c6297ca24aef4f6e6801f0afc921d1a7e67b2c06ce3deb"


def test_schema_copy_matches_the_pinned_spec():
    """deploy/sql/schema.sql is a copy so that a clone works on its own; it must not drift.
    (This test used to compare with the spec only when the spec was beside the checkout, so it
    skipped in every clone, CI's included.)"""
    copy = (ROOT / "deploy" / "sql" / "schema.sql").read_bytes()
    assert hashlib.sha256(copy).hexdigest() == SPEC_SCHEMA_SHA256


def test_the_pin_is_the_spec_beside_the_checkout():
    if not SPEC_SCHEMA.exists():
        pytest.skip(
            "the product spec is not beside this checkout (a clone); the pinned copy is checked above"
        )
    assert hashlib.sha256(SPEC_SCHEMA.read_bytes()).hexdigest() == SPEC_SCHEMA_SHA256, (
        "the spec's schema changed: copy it to deploy/sql/schema.sql and update the pin"
    )


def test_nothing_generated_or_binary_is_committed():
    """A 2.9 MB profiler wheel was once committed at the root, referenced nowhere."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    generated = (".whl", ".pyc", ".tar.gz", ".zip", ".egg-info", ".coverage", ".prof", ".svg")
    assert [path for path in tracked if path.endswith(generated) or "node_modules/" in path] == []
    large = [
        path for path in tracked if (ROOT / path).is_file() and (ROOT / path).stat().st_size > 256 * 1024
    ]
    assert large == [], "files over 256 KiB"
