"""The gateway: holds browser WebSockets, registers their sessions, delivers what Redis routes."""
