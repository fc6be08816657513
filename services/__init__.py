"""The Portico Push services: `gateway` (WebSockets) and `fetcher` (carts from PostgreSQL)."""
