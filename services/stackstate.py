"""Where a running local stack (`make run`) says what it started, for the CLI to find it.

`portico-push stack` writes STATE_FILE once everything is ready (the URLs of Redis, PostgreSQL,
the gateways, the fetchers and the demo page) and removes it when it stops; `portico-push
trigger`, `add-application` and `listen` take their defaults from it, so the README's commands
reach the stack even when it had to take other ports than 6390 and 5440.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# One stack per user (PORTICO_RUN_DIR: another place, for the tests).
RUN_DIR = Path(
    os.environ.get("PORTICO_RUN_DIR") or Path(tempfile.gettempdir()) / f"portico-push-{os.getuid()}"
)
STATE_FILE = RUN_DIR / "stack.json"
# What `make run` takes when the ports are free (and the CLI assumes without a state file).
DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6390/0",
    "database_url": "postgresql://postgres@127.0.0.1:5440/postgres",
    "gateways": ["ws://127.0.0.1:8080/wss", "ws://127.0.0.1:8081/wss"],
}


def write_state(state: dict[str, Any]) -> None:
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    partial = STATE_FILE.with_suffix(".part")
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(STATE_FILE)


def running_stack() -> dict[str, Any]:
    """The running stack's URLs, or `make run`'s defaults when none is running."""
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return dict(DEFAULTS)
    return {**DEFAULTS, **state} if isinstance(state, dict) else dict(DEFAULTS)
