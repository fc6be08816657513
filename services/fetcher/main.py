"""`portico-fetcher`: run one fetcher, configured only by environment variables."""

from __future__ import annotations

import uvicorn

from shared.logconfig import configure_logging
from shared.redis_clients import speedups_enabled
from shared.settings import FetcherSettings, load_or_exit

from .app import create_app
from .shutdown import HTTP_SECONDS


def main() -> None:
    settings = load_or_exit(FetcherSettings, "portico-fetcher")
    configure_logging(settings.log_level, f"fetcher[{settings.fetcher_id}]")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="auto" if speedups_enabled() else "asyncio",  # uvloop when installed
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=int(HTTP_SECONDS),  # then `Fetcher.stop` (shutdown.py)
    )


if __name__ == "__main__":
    main()
