"""Process-wide logging set-up shared by both services' entry points."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    # Access logs would print nothing useful per WebSocket and are noisy per probe.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
