"""`portico-fetcher`: run one fetcher, configured only by environment variables."""

from __future__ import annotations

import sys

import uvicorn

from shared.logconfig import configure_logging
from shared.settings import ConfigError, FetcherSettings

from .app import create_app


def main() -> None:
    try:
        settings = FetcherSettings.from_env()
    except ConfigError as exc:
        print(f"portico-fetcher: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, f"fetcher[{settings.fetcher_id}]")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
