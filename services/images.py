"""Building the container images (`make images`), with docker or podman, where no registry is reachable.

    python -m services.images [--engine podman|docker] [--tag local] [--test-servers]

Builds `portico-push-gateway:<tag>` and `portico-push-fetcher:<tag>` from the Dockerfiles in
`services/*/`. Their base is `PYTHON_IMAGE` when set; else the public `python:3.11.13-slim-bookworm`
if it is there or can be pulled; else a Debian 12 base with its own Python 3.11, made here with
`debootstrap` from Debian's packages and imported (`localhost/portico-push-python:3.11-bookworm`):
our machines reach no image registry. `--test-servers` also builds the Redis and PostgreSQL
images the test suite's testcontainers path runs (`tests/images/`), on the same base.

Settings, from the environment:
  CONTAINER_ENGINE   docker or podman (default: whichever answers, podman first)
  PYTHON_IMAGE       the base image to build on
  CA_BUNDLE          a CA bundle the build's pip and npm downloads must trust (a TLS-inspecting
                     proxy's); handed to the build as a secret, never stored in an image
  DEBIAN_MIRROR      the Debian mirror debootstrap and apt use (default http://deb.debian.org/debian)
  CONTAINERS_CONF    podman's settings: this repository's deploy/containers/containers.conf
                     unless set (runc, explicit ulimits: see that file)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_BASE = "python:3.11.13-slim-bookworm"
LOCAL_BASE = "localhost/portico-push-python:3.11-bookworm"
SERVICES = ("gateway", "fetcher")
TEST_SERVERS = ("redis", "postgres")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class ImageError(RuntimeError):
    """The images cannot be built here (says why, and what to set)."""


def containers_conf() -> str:
    return os.environ.get("CONTAINERS_CONF") or str(ROOT / "deploy" / "containers" / "containers.conf")


def engine_env() -> dict[str, str]:
    # DOCKER_BUILDKIT: build secrets (the CA bundle) need BuildKit with docker.
    return {"DOCKER_BUILDKIT": "1", **os.environ, "CONTAINERS_CONF": containers_conf()}


def _answers(engine: str) -> bool:
    if shutil.which(engine) is None:
        return False
    try:
        result = subprocess.run([engine, "info"], capture_output=True, env=engine_env(), timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def find_engine() -> str:
    """CONTAINER_ENGINE, or the first of podman and docker that answers (podman first: the docker
    CLI also answers through podman's Docker API socket, but cannot build with secrets there)."""
    chosen = os.environ.get("CONTAINER_ENGINE")
    for engine in [chosen] if chosen else ["podman", "docker"]:
        if engine and _answers(engine):
            return engine
    raise ImageError(
        f"no container engine answers ({chosen or 'docker, podman'}): install podman (Debian's "
        "podman, buildah and runc) or start a Docker engine"
    )


def run(
    engine: str, *args: str, quiet: bool = False, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [engine, *args], capture_output=quiet, text=True, env=engine_env(), timeout=timeout, check=False
    )


def image_exists(engine: str, image: str) -> bool:
    return run(engine, "image", "inspect", image, quiet=True).returncode == 0


def base_image(engine: str) -> str:
    """The image to build on (see the module's docstring)."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"]
    if image_exists(engine, PUBLIC_BASE):
        return PUBLIC_BASE
    if run(engine, "pull", PUBLIC_BASE, quiet=True, timeout=120).returncode == 0:
        return PUBLIC_BASE
    if not image_exists(engine, LOCAL_BASE):
        print(f"{PUBLIC_BASE} cannot be pulled here: building {LOCAL_BASE} with debootstrap", flush=True)
        build_local_base(engine)
    return LOCAL_BASE


def build_local_base(engine: str) -> None:
    """Debian 12 (bookworm) with its Python 3.11, from Debian's packages, imported as LOCAL_BASE."""
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if debootstrap is None or os.geteuid() != 0:
        raise ImageError(
            f"{PUBLIC_BASE} cannot be pulled, and a local base needs debootstrap run as root "
            "(Debian's debootstrap); or set PYTHON_IMAGE to a Python 3.11 image you have"
        )
    mirror = os.environ.get("DEBIAN_MIRROR", DEFAULT_MIRROR)
    with tempfile.TemporaryDirectory(prefix="portico-base-") as work:
        root = Path(work, "root")
        packages = "python3,python3-venv,python-is-python3,ca-certificates"
        result = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={packages}", "bookworm", str(root), mirror],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise ImageError(
                f"debootstrap failed ({tail[0] if tail else result.returncode}); DEBIAN_MIRROR={mirror}"
            )
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
        ):
            shutil.rmtree(root / junk, ignore_errors=True)
            (root / junk).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "apt" / "sources.list").write_text(f"deb {mirror} bookworm main\n")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [engine, "import", "--change", 'CMD ["python3"]', "-", LOCAL_BASE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            env=engine_env(),
        )
        tar.wait()
        if imported.returncode != 0:
            raise ImageError(f"{engine} import failed: {imported.stderr.strip()[-300:]}")


def build(engine: str, image: str, dockerfile: Path, context: Path, base: str) -> None:
    args = ["build", "-f", str(dockerfile), "--build-arg", f"PYTHON_IMAGE={base}", "-t", image]
    if engine == "podman":
        args += ["--format", "docker"]  # keeps HEALTHCHECK (the OCI format has none)
    bundle = os.environ.get("CA_BUNDLE")
    if bundle:
        if not Path(bundle).is_file():
            raise ImageError(f"CA_BUNDLE={bundle} is not a file")
        args += ["--secret", f"id=ca_bundle,src={bundle}"]
    result = run(engine, *args, str(context), quiet=True)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        hint = (
            "; a TLS-inspecting proxy is in the way: set CA_BUNDLE to its CA bundle "
            "(for instance /etc/ssl/certs/ca-certificates.crt)"
            if "CERTIFICATE_VERIFY_FAILED" in output or "self-signed certificate" in output
            else ""
        )
        last = [line for line in output.splitlines() if line.strip()][-3:]
        raise ImageError(f"building {image} failed{hint}:\n  " + "\n  ".join(last))


def size_mb(engine: str, image: str) -> float:
    result = run(engine, "image", "inspect", "--format", "{{.Size}}", image, quiet=True)
    return int(result.stdout.strip() or 0) / 1e6


def build_all(
    engine: str, tag: str, *, services: bool = True, test_servers: bool = False
) -> dict[str, float]:
    """Build what was asked; returns {image: size in MB}."""
    base = base_image(engine)
    built = {}
    if services:
        for service in SERVICES:
            image = f"portico-push-{service}:{tag}"
            build(engine, image, ROOT / "services" / service / "Dockerfile", ROOT, base)
            built[image] = size_mb(engine, image)
    if test_servers:
        for server in TEST_SERVERS:
            image = f"portico-push-{server}:{tag}"
            folder = ROOT / "tests" / "images" / server
            build(engine, image, folder / "Dockerfile", folder, base)
            built[image] = size_mb(engine, image)
    return built


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.images", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", help="docker or podman (default: CONTAINER_ENGINE, or whichever answers)")
    parser.add_argument("--tag", default="local")
    parser.add_argument(
        "--test-servers", action="store_true", help="also the Redis and PostgreSQL test images"
    )
    parser.add_argument("--only-test-servers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        os.environ["CONTAINER_ENGINE"] = args.engine
    try:
        engine = find_engine()
        built = build_all(
            engine,
            args.tag,
            services=not args.only_test_servers,
            test_servers=args.test_servers or args.only_test_servers,
        )
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    for image, size in built.items():
        print(f"built {image} with {engine}: {size:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
