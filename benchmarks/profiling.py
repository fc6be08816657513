"""Where a process's CPU goes, by stage: py-spy samples taken during a benchmark phase.

`make bench` installs py-spy (PyPI, pinned below) into the venv on first use; nothing of it is
committed. It samples from outside (`--nonblocking`: the process is never paused) and writes
raw stacks; each sample goes to the stage of the first frame, from the innermost out, that a
stage's patterns name, or else to "event loop and I/O" (uvloop's own C code: waiting, the
socket reads and writes, the wake-ups). A stage's share of the samples times the process's CPU
per trigger is its CPU per trigger.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = "py-spy==0.4.3"
OTHER = "event loop and I/O"

# (stage, patterns on "function (file)"): the first stage whose pattern a frame matches.
FETCHER_STAGES = [
    ("discard or keep", [r"\._serves", r"handover\.py", r"\bowns \("]),
    (
        "receive and parse",
        [
            r"PubSubConnection",
            r"subscription\.py",
            r"triggers\.py",
            r"\._dispatch",
            r"\._on_trigger",
            r"\._on_routed",
            r"\._on_request",
            r"json/decoder",
        ],
    ),
    ("SQL", [r"store\.py", r"asyncpg/"]),
    ("shaping", [r"carts\.py"]),
    ("encoding", [r"envelopes\.py", r"routing\.py", r"codec\.py", r"msgpack", r"json/encoder"]),
    ("publish", [r"publisher\.py"]),
    (
        "Redis",
        [
            r"CommandConnection",
            r"DirectCommands",
            r"_Connection\.",
            r"cartstate\.py",
            r"redis/",
            r"registry\.py",
            r"shards\.py",
        ],
    ),
    ("batching", [r"coalescer\.py", r"service\.py"]),
]
GATEWAY_STAGES = [
    ("receive", [r"PubSubConnection", r"subscription\.py"]),
    ("decode", [r"envelopes\.py", r"msgpack"]),
    ("render", [r"rendering\.py"]),
    ("seq check and fan-out", [r"fanout\.py", r"hub\.py"]),
    (
        "write",
        [r"writer\.py", r"outbox\.py", r"websocket_transport\.py", r"websockets/", r"uvicorn", r"tab\.py"],
    ),
]
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> tuple[str | None, str]:
    """The py-spy binary (installed into this venv if missing), or None and why not."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PY_SPY],
            capture_output=True,
            text=True,
        )
        found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if not found:
            return None, f"py-spy could not be installed ({result.stderr.strip().splitlines()[-1:]})"
    return found, ""


def record(binary: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [binary, "record", "--nonblocking", "--rate", "250", "--duration", str(int(seconds)),
         "--format", "raw", "--output", str(out), "--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def by_stage(raw: Path, stages: list[tuple[str, list[str]]]) -> dict[str, float]:
    """Share of the samples per stage (empty when the profile could not be taken)."""
    if not raw.exists():
        return {}
    compiled = [(stage, [re.compile(p) for p in patterns]) for stage, patterns in stages]
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        counts[_stage(stack.split(";"), compiled)] += int(count)
    total = sum(counts.values())
    return {stage: n / total for stage, n in counts.most_common()} if total else {}


def _stage(frames: list[str], stages: list[tuple[str, list[re.Pattern[str]]]]) -> str:
    for frame in reversed(frames):  # innermost first
        match = FRAME.match(frame)
        text = f"{match['function']} ({match['file']})" if match else frame
        for stage, patterns in stages:
            if any(p.search(text) for p in patterns):
                return stage
    return OTHER


def describe(shares: dict[str, float], ms_per_trigger: float) -> str:
    if not shares:
        return "no profile"
    return ", ".join(
        f"{stage} {share * ms_per_trigger:.3f} ms ({share:.0%})" for stage, share in shares.items()
    )
