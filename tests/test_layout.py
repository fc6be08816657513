"""The layout is part of the design: imports go one way, the core knows no transport, no module
grows into a hub again.

Read as a newcomer would, the gateway had grown back into one: `app.py` held the core and the
ASGI wiring, five modules imported each other in a circle (the back-imports `TYPE_CHECKING`
only, which hid them from the interpreter but not from the reader), and the core branched on
`transport == "socketio"`. These checks read the source, so they hold in any clone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "services")
MAX_LINES = 600
# The gateway's core: what a push and a tab's message go through, whatever the transport.
CORE = (
    "services.gateway.gateway",
    "services.gateway.tab",
    "services.gateway.writer",
    "services.gateway.fanout",
    "services.gateway.relays",
    "services.gateway.fetcher_requests",
    "services.gateway.ownership",
    "services.gateway.hub",
    "services.gateway.outbox",
    "services.gateway.rendering",
    "services.gateway.pending_requests",
    "services.gateway.tab_protocol",
    "services.gateway.budgets",
    "services.gateway.shutdown",
)
NOT_IN_THE_CORE = (
    "starlette",
    "uvicorn",
    "websockets",
    "services.gateway.engineio",
    "services.gateway.socketio",
    "services.gateway.socketio_transport",
    "services.gateway.websocket_transport",
    "services.gateway.uvicorn_protocols",
    "services.gateway.asgi",
    "services.gateway.main",
)


TRANSPORTS = ("socketio", "websocket", "polling")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports, at any depth of the file (functions and `TYPE_CHECKING`
    blocks included), resolved to the project's modules where it names one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    return {name: imports_of(name, path, names) & names - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_services_and_shared():
    assert cycles(graph()) == []


def transport_branches(source: str) -> list[int]:
    """Lines that compare something with a transport's name (`transport == "socketio"`)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Compare)
        and any(isinstance(c, ast.Constant) and c.value in TRANSPORTS for c in [node.left, *node.comparators])
    ]


def test_the_transport_check_finds_a_branch():
    """The old writer's branch is found; a metric label is not a branch."""
    old = "async def write(client, frame):\n    if frame.seq and client.transport == 'socketio':\n        pass\n"
    assert transport_branches(old) == [2]
    assert transport_branches('class Link:\n    transport = "socketio"\n') == []


def test_the_cycle_check_finds_a_cycle():
    """The check above must be able to fail: a back-import under TYPE_CHECKING counts."""
    edges = graph()
    edges["services.gateway.tab"] = edges["services.gateway.tab"] | {"services.gateway.gateway"}
    assert ["services.gateway.gateway", "services.gateway.tab"] in [
        [m for m in c if m in ("services.gateway.gateway", "services.gateway.tab")] for c in cycles(edges)
    ]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .gateway import Gateway\n"
    path = ROOT / "tests" / "_layout_probe.py"
    try:
        path.write_text(source)
        assert "services.gateway.gateway" in imports_of("services.gateway.probe", path, set(modules()))
    finally:
        path.unlink()


@pytest.mark.parametrize("core", CORE)
def test_the_gateway_core_knows_no_transport(core: str):
    """The core writes through `tab.Link`; Starlette, uvicorn, Engine.IO, Socket.IO and the
    transports are the transports' and the wiring's business."""
    imported = imports_of(core, modules()[core], set(modules()))
    forbidden = {
        m for m in imported for banned in NOT_IN_THE_CORE if m == banned or m.startswith(banned + ".")
    }
    assert not forbidden, f"{core} imports {sorted(forbidden)}"
    branches = transport_branches(modules()[core].read_text())
    assert not branches, f"{core} branches on a transport at line(s) {branches}"


def test_no_module_over_600_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
