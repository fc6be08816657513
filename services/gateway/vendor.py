"""The official socket.io-client browser bundle, served at `/wss/socket.io/socket.io.js`.

Fetched at install/build time (`make install`, the Dockerfile) from the npm registry, checked
against the integrity hash npm publishes for that version (`npm view socket.io-client@4.8.1
dist.integrity`), and unpacked next to this module; never committed, never edited. Without it
(no registry at install time) the route answers 404 with `BUNDLE_MISSING`.

    python -m services.gateway.vendor     # fetch (again) and verify
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

SOCKETIO_CLIENT_VERSION = "4.8.1"  # what today's Portico frontend uses (socket.io-client 4.8.x)
SOCKETIO_CLIENT_INTEGRITY = (
    "sha512-hJVXfu3E28NmzGk8o1sHhN3om52tRvwYeidbj7xKy2eIIse5IoKX3USlS6Tqt3BHAtflLIkCQBkzVrEEfWUyYQ=="
)
REGISTRY = os.environ.get("NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")
TARBALL_URL = f"{REGISTRY}/socket.io-client/-/socket.io-client-{SOCKETIO_CLIENT_VERSION}.tgz"
MEMBER = "package/dist/socket.io.min.js"
SOCKETIO_BUNDLE = Path(__file__).resolve().parent / "static" / "vendor" / "socket.io.min.js"
BUNDLE_MISSING = (
    f"socket.io-client {SOCKETIO_CLIENT_VERSION} is not installed on this gateway: "
    "run `python -m services.gateway.vendor` (needs the npm registry), see the README"
)


class BundleError(RuntimeError):
    pass


def verify(tarball: bytes) -> None:
    algorithm, _, expected = SOCKETIO_CLIENT_INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if actual != expected:
        raise BundleError(f"integrity mismatch for {TARBALL_URL}: got {algorithm}-{actual}")


def install(target: Path = SOCKETIO_BUNDLE) -> Path:
    with urllib.request.urlopen(TARBALL_URL, timeout=60) as response:
        tarball = response.read()
    verify(tarball)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile(MEMBER)
        if member is None:
            raise BundleError(f"{MEMBER} is not in the package")
        bundle = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(bundle)
    partial.replace(target)
    return target


def main() -> int:
    try:
        path = install()
    except (OSError, BundleError) as exc:
        print(f"socket.io-client bundle not installed: {exc}", file=sys.stderr)
        return 1
    print(f"socket.io-client {SOCKETIO_CLIENT_VERSION} bundle verified and installed: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
