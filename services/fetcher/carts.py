"""The cart: one session's partial applications, read in one statement and shaped like PHP did.

`CART_QUERY` reads everything a cart needs in a single round trip whatever its size (the old
server ran 1 + 7 queries per application); `shape_application` turns one row into the JSON
object of PROTOCOL.md §5.3. The shaping is pure and tested without a database.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

OSLO = ZoneInfo("Europe/Oslo")
PARTIAL_STATUS = "NEWPARTIAL1"

# One statement, one snapshot: correlated subqueries aggregate each child table to JSON.
# Timestamps travel as text (naive Oslo time), numerics as JSON numbers parsed back to strings.
CART_QUERY = """
SELECT
  a.session_id AS cart_session_id, a.id, a.id_string, a.active, a.display_in_dashboard, a.type, a.status, a.secret,
  a.created::text AS created, a.modified::text AS modified,
  a.frontend_modified::text AS frontend_modified,
  a.building_name, a.building_id, a.activity_id, a.owner_id, a.case_officer_id,
  a.name, a.organizer, a.homepage, a.description, a.equipment,
  a.contact_name, a.contact_email, a.contact_phone,
  a.customer_identifier_type, a.customer_ssn, a.customer_organization_number,
  a.customer_organization_name, a.customer_organization_id,
  a.responsible_street, a.responsible_zip_code, a.responsible_city,
  a.agreement_requirements, a.external_archive_key,
  (SELECT json_agg(json_build_object('id', d.id, 'from_', d.from_::text, 'to_', d.to_::text)
                   ORDER BY d.from_, d.id)
     FROM bb_application_date d WHERE d.application_id = a.id) AS dates,
  (SELECT json_agg(json_build_object(
            'id', r.id, 'name', r.name, 'activity_id', r.activity_id, 'active', r.active,
            'rescategory_id', r.rescategory_id, 'simple_booking', r.simple_booking,
            'building_id', COALESCE(
              (SELECT br.building_id FROM bb_building_resource br
                WHERE br.resource_id = r.id AND br.building_id = a.building_id),
              (SELECT min(br.building_id) FROM bb_building_resource br
                WHERE br.resource_id = r.id)))
          ORDER BY r.id)
     FROM bb_application_resource ar JOIN bb_resource r ON r.id = ar.resource_id
    WHERE ar.application_id = a.id) AS resources,
  (SELECT json_agg(json_build_object(
            'line_id', l.id, 'order_id', l.order_id, 'status', l.status,
            'parent_mapping_id', l.parent_mapping_id, 'article_mapping_id', l.article_mapping_id,
            'quantity', l.quantity, 'unit_price', l.unit_price,
            'overridden_unit_price', l.overridden_unit_price, 'currency', l.currency,
            'amount', l.amount, 'unit', am.unit, 'tax_code', l.tax_code, 'tax', l.tax,
            'name', CASE am.article_cat_id
                      WHEN 1 THEN (SELECT rr.name FROM bb_resource rr WHERE rr.id = am.article_id)
                      WHEN 2 THEN (SELECT s.name FROM bb_service s WHERE s.id = am.article_id)
                    END)
          ORDER BY l.id)
     FROM bb_purchase_order po
     JOIN bb_purchase_order_line l ON l.order_id = po.id
     JOIN bb_article_mapping am ON am.id = l.article_mapping_id
    WHERE po.application_id = a.id AND po.cancelled IS NULL) AS order_lines,
  (SELECT json_agg(json_build_object(
            'id', g.id, 'activity_id', g.activity_id, 'name', g.name, 'sort', g.sort,
            'description', g.description, 'active', g.active, 'male', ag.male, 'female', ag.female)
          ORDER BY g.sort, g.id)
     FROM bb_application_agegroup ag JOIN bb_agegroup g ON g.id = ag.agegroup_id
    WHERE ag.application_id = a.id) AS agegroups,
  (SELECT json_agg(t.id ORDER BY t.sort, t.id)
     FROM bb_application_targetaudience at JOIN bb_targetaudience t ON t.id = at.targetaudience_id
    WHERE at.application_id = a.id) AS audience,
  (SELECT json_agg(json_build_object(
            'id', doc.id, 'name', doc.name, 'description', doc.description,
            'category', doc.category, 'owner_id', doc.owner_id)
          ORDER BY doc.id)
     FROM bb_document_application doc WHERE doc.owner_id = a.id) AS documents
FROM bb_application a
WHERE a.session_id = $1 AND a.status = 'NEWPARTIAL1'
ORDER BY a.id
"""
# The carts of many sessions in one statement (rows grouped by `cart_session_id`). A batch of
# one keeps `CART_QUERY`: a one-element `= ANY($1)` is re-planned and costs twice as much.
CART_BATCH_QUERY = CART_QUERY.replace("a.session_id = $1", "a.session_id = ANY($1::varchar[])")

# Top-level scalar columns in output order; NULL ones are omitted (PHP serializer).
_SCALARS = (
    "id",
    "id_string",
    "active",
    "display_in_dashboard",
    "type",
    "status",
    "secret",
    "created",
    "modified",
    "frontend_modified",
    "building_name",
    "building_id",
    "activity_id",
    "owner_id",
    "case_officer_id",
    "name",
    "organizer",
    "homepage",
    "description",
    "equipment",
    "contact_name",
    "contact_email",
    "contact_phone",
    "customer_identifier_type",
    "customer_ssn",
    "customer_organization_number",
    "customer_organization_name",
    "customer_organization_id",
    "responsible_street",
    "responsible_zip_code",
    "responsible_city",
    "agreement_requirements",
    "external_archive_key",
)
_LINE_KEYS = (
    "order_id",
    "status",
    "parent_mapping_id",
    "article_mapping_id",
    "quantity",
    "unit_price",
    "overridden_unit_price",
    "currency",
    "amount",
    "unit",
    "tax_code",
    "tax",
    "name",
)


def _children(value: str | None) -> list[Any]:
    """A json_agg column: NULL when there are no rows. Numerics come back as strings ("125.00")."""
    if value is None:
        return []
    result: list[Any] = json.loads(value, parse_float=str)
    return result


def _decode(value: Any) -> Any:
    """HTML-entity-decode every string, recursively (the PHP serializer decoded strings)."""
    if isinstance(value, str):
        return html.unescape(value) if "&" in value else value
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def oslo_iso(naive_local: str) -> str:
    """`2025-06-03 17:00:00` (naive Oslo time) -> `2025-06-03T17:00:00+02:00`.

    Ambiguous or skipped local times at a DST change take the earlier offset (fold=0).
    """
    local = datetime.fromisoformat(naive_local).replace(tzinfo=OSLO, fold=0)
    return local.isoformat(timespec="seconds")


def _decimal(value: str | None) -> Decimal:
    return Decimal(value) if value is not None else Decimal(0)


def shape_application(row: Mapping[str, Any]) -> dict[str, Any]:
    """One `CART_QUERY` row -> one application object (PROTOCOL.md §5.3)."""
    app: dict[str, Any] = {k: row[k] for k in _SCALARS if row[k] is not None}

    dates = [
        {"id": d["id"], "from_": oslo_iso(d["from_"]), "to_": oslo_iso(d["to_"])}
        for d in _children(row["dates"])
    ]
    resources = [{k: v for k, v in r.items() if v is not None} for r in _children(row["resources"])]
    lines = _children(row["order_lines"])
    orders = [
        {
            "order_id": line["line_id"],
            "sum": float(_decimal(line["amount"]) + _decimal(line["tax"])),
            "lines": [{k: line[k] for k in _LINE_KEYS}],
        }
        for line in lines
    ]
    articles = [
        {
            "id": line["article_mapping_id"],
            "quantity": int(_decimal(line["quantity"])),  # int() truncates toward zero
            "parent_id": line["parent_mapping_id"],
        }
        for line in lines
    ]
    documents = _children(row["documents"])

    if dates:
        app["dates"] = dates
    if resources:
        app["resources"] = resources
    if orders:
        app["orders"] = orders
    app["articles"] = articles
    app["agegroups"] = _children(row["agegroups"])
    app["audience"] = _children(row["audience"])
    if documents:
        app["documents"] = documents
    decoded: dict[str, Any] = _decode(app)
    return decoded
