"""The cart: golden shape (PROTOCOL.md §5.3) and a constant number of round trips."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.fetcher.carts import oslo_iso
from services.fetcher.store import PostgresCartStore
from tests.support.data import add_application, seed_reference
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.anyio

SID = "golden-session-1"
GOLDEN = Path(__file__).parent / "golden" / "cart.json"


def test_oslo_times_take_the_right_offset_on_both_sides_of_dst():
    assert oslo_iso("2025-06-03 17:00:00") == "2025-06-03T17:00:00+02:00"  # summer
    assert oslo_iso("2025-12-06 12:00:00") == "2025-12-06T12:00:00+01:00"  # winter
    assert oslo_iso("2025-03-30 01:59:59") == "2025-03-30T01:59:59+01:00"  # just before spring-forward
    assert oslo_iso("2025-03-30 03:00:00") == "2025-03-30T03:00:00+02:00"  # just after
    assert oslo_iso("2025-03-30 02:30:00") == "2025-03-30T02:30:00+01:00"  # skipped: earlier offset
    assert oslo_iso("2025-10-26 02:30:00") == "2025-10-26T02:30:00+02:00"  # ambiguous: earlier offset
    assert oslo_iso("2025-10-26 03:00:00") == "2025-10-26T03:00:00+01:00"
    assert oslo_iso("2025-06-03 17:00:00.123456") == "2025-06-03T17:00:00+02:00"


async def build_golden_cart(db: asyncpg.Connection) -> None:
    await seed_reference(db)
    first = await add_application(
        db,
        SID,
        name="Korps &amp; kor &lt;3",
        building_id=1,
        building_name="Hall A",
        description=None,
        organizer="Ola &quot;Dirigent&quot;",
        created="2025-05-12 11:50:00.5",
        frontend_modified="2025-05-12 11:51:00",
        customer_organization_id=None,
        case_officer_id=7,
    )
    second = await add_application(db, SID, name="Tom", created="2025-05-12 12:00:00", building_id=5)
    await add_application(db, SID, name="Not partial", status="NEW")
    await add_application(db, "someone-else", name="Other cart")
    await db.execute(
        """
        INSERT INTO bb_application_date (application_id, from_, to_) VALUES
          ($1, '2025-10-26 02:30:00', '2025-10-26 04:00:00'),
          ($1, '2025-03-30 01:00:00', '2025-03-30 02:30:00'),
          ($1, '2025-06-03 17:00:00', '2025-06-03 19:00:00');
        INSERT INTO bb_application_resource (application_id, resource_id) VALUES ($1, 2), ($1, 1), ($2, 3);
        INSERT INTO bb_application_agegroup (application_id, agegroup_id, male, female) VALUES ($1, 1, 3, 4), ($1, 2, 0, 2);
        INSERT INTO bb_application_targetaudience (application_id, targetaudience_id) VALUES ($1, 1), ($1, 2);
        INSERT INTO bb_document_application (name, owner_id, category, description) VALUES ('plan.pdf', $1, 'other', NULL);
        INSERT INTO bb_purchase_order (id, application_id, cancelled) VALUES (10, $1, NULL), (11, $1, 1700000000);
        INSERT INTO bb_purchase_order_line (id, order_id, parent_mapping_id, article_mapping_id, unit_price,
                                            overridden_unit_price, currency, quantity, amount, tax_code, tax)
          VALUES (21, 10, 1, 2, 20.00, NULL, 'NOK', 2.75, 55.00, 3, 13.75),
                 (20, 10, 1, 1, 250.00, 0.00, 'NOK', 2.00, 500.00, 3, 125.00),
                 (22, 11, 1, 1, 1.00, 0.00, 'NOK', 1.00, 1.00, 3, 0.25);
        """.replace("$1", str(first)).replace("$2", str(second))
    )


async def test_golden_cart_shape(db: asyncpg.Connection, database_url: str):
    """Pins §5.3: DST both sides, omitted/kept nulls, decimals as strings, decoded entities,
    no session_id, orders per line with a numeric sum, cancelled orders left out."""
    await build_golden_cart(db)
    store = PostgresCartStore(database_url, pool_size=1, timeout=5)
    try:
        cart = await store.fetch_cart(SID)
    finally:
        await store.close()
    expected = json.loads(GOLDEN.read_text())
    assert cart == expected
    # And byte-for-byte as it is encoded to clients:
    assert json.dumps(cart, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)


def _via(url: str, port: int) -> str:
    """`url` through a proxy on `port`, credentials kept (a testcontainers PostgreSQL needs its
    password; the local servers trust, which hid that this dropped it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    credentials = f"{user}:{parts.password}" if parts.password else user
    return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))


async def test_a_cart_costs_the_same_round_trips_for_1_or_20_applications(db, database_url):
    await seed_reference(db)
    for sid, n in (("one-app", 1), ("twenty-apps", 20)):
        for i in range(n):
            app_id = await add_application(db, sid, name=f"a{i}")
            await db.execute(
                f"INSERT INTO bb_application_date (application_id, from_, to_) VALUES ({app_id}, '2025-06-03 17:00', '2025-06-03 18:00');"
                f"INSERT INTO bb_application_resource (application_id, resource_id) VALUES ({app_id}, 1);"
            )
    port = urlsplit(database_url).port or 5432
    proxy = await TcpProxy(port, count_pg_messages=True).start()
    store = PostgresCartStore(_via(database_url, proxy.port), pool_size=1, timeout=5)
    try:
        await store.fetch_cart("warm-up")  # connection set-up and statement preparation
        proxy.messages.clear()
        assert len(await store.fetch_cart("one-app")) == 1
        one = proxy.round_trips
        proxy.messages.clear()
        assert len(await store.fetch_cart("twenty-apps")) == 20
        twenty = proxy.round_trips
    finally:
        await store.close()
        await proxy.cut()
    assert one == twenty == 1, (one, twenty)
