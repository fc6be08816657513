"""Rows for the Portico tables: reference data and partial applications."""

from __future__ import annotations

import asyncpg


async def seed_reference(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO bb_activity (id, name, description) VALUES (1, 'Idrett', 'Sport');
        INSERT INTO bb_building (id, activity_id, name, homepage) VALUES (1, 1, 'Hall A', ''), (2, 1, 'Hall B', '');
        INSERT INTO bb_resource (id, name, activity_id, rescategory_id, simple_booking)
          VALUES (1, 'Storsal', 1, 3, 1), (2, 'Lillesal', 1, NULL, NULL), (3, 'Garderobe', 1, NULL, 0);
        INSERT INTO bb_building_resource (building_id, resource_id) VALUES (1, 1), (2, 1), (2, 2);
        INSERT INTO fm_ecomva (id, percent_, descr) VALUES (3, 25, 'Høy');
        INSERT INTO bb_article_category (id, name) VALUES (1, 'resource'), (2, 'service');
        INSERT INTO bb_service (id, name) VALUES (1, 'Kaffe &amp; kake');
        INSERT INTO bb_article_mapping (id, article_cat_id, article_id, article_code, unit, tax_code)
          VALUES (1, 1, 1, 'R1', 'hour', 3), (2, 2, 1, 'S1', 'each', 3);
        INSERT INTO bb_agegroup (id, activity_id, name, sort, description) VALUES
          (1, 1, 'Voksne', 2, NULL), (2, 1, 'Barn', 1, 'Under 12');
        INSERT INTO bb_targetaudience (id, activity_id, name, sort) VALUES (1, 1, 'B', 2), (2, 1, 'A', 1);
        """
    )


async def add_application(
    db: asyncpg.Connection, session_id: str, name: str = "Søknad", **columns: object
) -> int:
    values: dict[str, object] = {
        "status": "NEWPARTIAL1",
        "modified": "2025-05-12 11:54:20",
        "activity_id": 1,
        "contact_name": "Kari",
        "contact_email": "kari@example.no",
        "contact_phone": "12345678",
        "secret": "s3cret",
        "owner_id": 0,
        "session_id": session_id,
        "name": name,
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(
        f"${i}::timestamp" if k in ("modified", "created", "frontend_modified") else f"${i}"
        for i, k in enumerate(values, 1)
    )
    app_id: int = await db.fetchval(
        f"INSERT INTO bb_application ({names}) VALUES ({params}) RETURNING id",
        *[_ts(k, v) for k, v in values.items()],
    )
    return app_id


def _ts(key: str, value: object) -> object:
    if key in ("modified", "created", "frontend_modified") and isinstance(value, str):
        import datetime

        return datetime.datetime.fromisoformat(value)
    return value
