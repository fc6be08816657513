"""The metrics catalog: every Prometheus metric either service exports, in one place.

Names are `portico_<service>_<what>_<unit>`; labels take only small fixed value sets. Each
service instance owns its own `CollectorRegistry` so that several instances can run in one
process (tests) without sharing counters.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "FetcherMetrics", "GatewayMetrics", "render"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


_Metric = TypeVar("_Metric", Counter, Gauge)


def _with_labels(metric: _Metric, *values: str) -> _Metric:
    """Export every known label value at 0 from the start: a labelled metric that has no
    series until its first event shows "No data" in dashboards and breaks `rate()` alerts."""
    for value in values:
        metric.labels(value)
    return metric


# The known label values, in one place (a new value used in code should be added here).
HANDSHAKE_REJECTIONS = ("origin", "draining", "capacity")
ENGINEIO_TRANSPORTS = ("polling", "websocket")
SLOW_CONSUMER_ACTIONS = ("cart_replaced", "closed")
CLIENT_ERROR_CODES = (
    "NO_SESSION",
    "INVALID_SESSION_ID",
    "INVALID_JSON",
    "INVALID_MESSAGE",
    "UNSUPPORTED_MESSAGE_TYPE",
    "RATE_LIMITED",
    "ROOM_ACCESS_DENIED",
)
TRANSPORTS = ("websocket", "socketio")
INVALID_INPUT_REASONS = (
    "too_large",
    "not_json",
    "not_object",
    "unknown_type",
    "reserved_type",
    "bad_session_id",
    "bad_data",
    "bad_room",
    "bad_request",
)
TRIGGER_TYPES = (
    "update_partial_applications",
    "session_targeted",
    "refresh_bookinguser",
    "notifications",
    "room_messages",
)
REQUEST_KINDS = ("get", "join", "refresh")
DELIVERY_KINDS = ("cart", "event", "room", "broadcast")  # session events, room events, broadcasts


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ns = "portico_gateway"
        self.connections = Gauge(f"{ns}_connections", "Open connections (every transport)", registry=r)
        self.connections_by_transport = _with_labels(
            Gauge(
                f"{ns}_connections_by_transport",
                "Open connections by transport: websocket (raw) or socketio",
                ["transport"],
                registry=r,
            ),
            *TRANSPORTS,
        )
        self.engineio_sessions = _with_labels(
            Gauge(
                f"{ns}_engineio_sessions",
                "Engine.IO sessions (Socket.IO tabs, connected or not yet) by Engine.IO transport",
                ["transport"],
                registry=r,
            ),
            *ENGINEIO_TRANSPORTS,
        )
        self.sessions_held = Gauge(f"{ns}_sessions_held", "Sessions with a socket here", registry=r)
        self.handshakes_rejected = _with_labels(
            Counter(f"{ns}_handshakes_rejected_total", "Handshakes refused", ["reason"], registry=r),
            *HANDSHAKE_REJECTIONS,
        )
        self.messages_received = _with_labels(
            Counter(f"{ns}_messages_received_total", "Client messages by type", ["type"], registry=r),
            "text",
            "binary",
        )
        self.messages_sent = Counter(
            f"{ns}_messages_sent_total", "Frames written to sockets by type", ["type"], registry=r
        )
        self.bytes_sent = Counter(f"{ns}_sent_bytes_total", "Bytes written to sockets", registry=r)
        self.send_failures = Counter(f"{ns}_send_failures_total", "Failed socket writes", registry=r)
        self.client_errors = _with_labels(
            Counter(f"{ns}_client_errors_total", "Error replies sent to clients", ["code"], registry=r),
            *CLIENT_ERROR_CODES,
        )
        self.slow_consumers = _with_labels(
            Counter(
                f"{ns}_slow_consumer_total",
                "Slow-consumer actions: a queued cart replaced, or a socket closed on overflow",
                ["action"],
                registry=r,
            ),
            *SLOW_CONSUMER_ACTIONS,
        )
        self.stale_carts_dropped = Counter(
            f"{ns}_stale_carts_dropped_total", "Cart pushes older than one already sent", registry=r
        )
        self.deliveries_invalid = Counter(
            f"{ns}_deliveries_invalid_total", "Undecodable envelopes on the gateway channel", registry=r
        )
        self.carts_recovered = Counter(
            f"{ns}_carts_recovered_total",
            "Socket.IO reconnects whose offset was the newest cart here: no cart asked for",
            registry=r,
        )
        self.requests_timed_out = Counter(
            f"{ns}_requests_timed_out_total", "Cart requests the fetchers did not answer", registry=r
        )
        self.redis_subscription_up = Gauge(
            f"{ns}_redis_subscription_up", "1 while every subscription of the gateway is live", registry=r
        )
        self.redis_last_message_age = Gauge(
            f"{ns}_redis_last_message_age_seconds",
            "Seconds since the last message or pong on the gateway's subscription",
            registry=r,
        )
        self.redis_deaf = Counter(
            f"{ns}_redis_deaf_total",
            "Delivery probes that did not come back: a subscription found deaf, then reconnected",
            registry=r,
        )
        self.draining = Gauge(f"{ns}_draining", "1 while the gateway drains its sockets", registry=r)
        self.requests_pending = Gauge(
            f"{ns}_requests_pending", "Cart requests waiting for a fetcher's answer", registry=r
        )
        self.push_latency = Histogram(
            f"{ns}_trigger_to_socket_seconds",
            "From the trigger's arrival at a fetcher to the socket write",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )


class FetcherMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ns = "portico_fetcher"
        self.triggers = _with_labels(
            Counter(
                f"{ns}_triggers_total", "Valid messages on session_messages by type", ["type"], registry=r
            ),
            *TRIGGER_TYPES,
        )
        self.triggers_invalid = _with_labels(
            Counter(f"{ns}_triggers_invalid_total", "Dropped malformed inputs", ["reason"], registry=r),
            *INVALID_INPUT_REASONS,
        )
        self.triggers_other_shard = Counter(
            f"{ns}_triggers_other_shard_total", "Triggers left to the fetcher owning the shard", registry=r
        )
        self.triggers_coalesced = Counter(
            f"{ns}_triggers_coalesced_total", "Work merged into an already pending fetch", registry=r
        )
        self.triggers_unheld = Counter(
            f"{ns}_triggers_unheld_total", "Triggers for sessions no gateway holds", registry=r
        )
        self.handover_replayed = Counter(
            f"{ns}_handover_replayed_total",
            "Messages kept after another fetcher's hand-over marker and served once this one took the shard",
            registry=r,
        )
        self.events_dropped = Counter(
            f"{ns}_events_dropped_total",
            "Events left out, oldest first, because a session's or room's queue was full",
            registry=r,
        )
        self.requests = _with_labels(
            Counter(f"{ns}_requests_total", "Requests from gateways by kind", ["kind"], registry=r),
            *REQUEST_KINDS,
        )
        self.fetch_duration = Histogram(
            f"{ns}_fetch_duration_seconds", "Cart query time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.db_errors = Counter(f"{ns}_db_errors_total", "Failed cart queries", registry=r)
        self.cart_queries = Counter(
            f"{ns}_cart_queries_total", "Cart SQL statements (one per batch of sessions)", registry=r
        )
        self.carts_read = Counter(f"{ns}_carts_read_total", "Carts read from PostgreSQL", registry=r)
        self.carts_from_snapshot = Counter(
            f"{ns}_carts_from_snapshot_total",
            "Carts served from the Redis snapshot instead of PostgreSQL (joins, requests)",
            registry=r,
        )
        self.batch_size = Histogram(
            f"{ns}_batch_sessions",
            "Sessions per fetch batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.carts_unshapeable = Counter(
            f"{ns}_carts_unshapeable_total",
            "Carts whose rows cannot be shaped into JSON (sent as an error cart)",
            registry=r,
        )
        self.work_failed = Counter(
            f"{ns}_work_failed_total", "Fetch or delivery work that failed and was retried", registry=r
        )
        self.deliveries_published = _with_labels(
            Counter(
                f"{ns}_deliveries_published_total", "Envelopes published to gateways", ["kind"], registry=r
            ),
            *DELIVERY_KINDS,
        )
        self.shards_held = Gauge(f"{ns}_shards_held", "Shards this fetcher serves", registry=r)
        self.shards_configured = Gauge(
            f"{ns}_shards_configured", "SHARDS: how many shards all fetchers split between them", registry=r
        )
        self.shards_agree = Gauge(
            f"{ns}_shards_agree",
            "1 while this fetcher's SHARDS is the running fleet's (0: it holds no shard, see the log)",
            registry=r,
        )
        self.redis_subscription_up = Gauge(
            f"{ns}_redis_subscription_up", "1 while every subscription of the fetcher is live", registry=r
        )
        self.redis_last_message_age = Gauge(
            f"{ns}_redis_last_message_age_seconds",
            "Seconds since the last message or pong on the fetcher's subscription",
            registry=r,
        )
        self.redis_deaf = Counter(
            f"{ns}_redis_deaf_total",
            "Delivery probes that did not come back: a subscription found deaf, then reconnected",
            registry=r,
        )
        self.work_pending = Gauge(f"{ns}_work_pending", "Sessions waiting for or in a fetch", registry=r)
        self.db_up = Gauge(f"{ns}_database_up", "1 while the last database check succeeded", registry=r)
