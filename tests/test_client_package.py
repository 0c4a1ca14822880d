"""The client package stands apart: the gateway must not depend on its client.

A worker that imported `client/` would ship the client's dependencies and
could start trusting the client's view of the protocol; the layering is
checked on the source, so a stray import fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_gateway_never_imports_the_client() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "gateway").rglob("*.py"))
                 if "client" in _imported_packages(path)]
    assert offenders == []


def test_the_client_needs_nothing_from_the_server() -> None:
    """It speaks only the wire (PROTOCOL.md), so bots can use it without oddsgate."""
    server_side = {"gateway", "feed", "redis_contract", "supervisor", "haproxy", "bench"}
    for path in sorted((ROOT / "client").rglob("*.py")):
        assert _imported_packages(path) & server_side == set(), path


def test_the_package_exports_the_client_and_its_checker() -> None:
    import client

    assert client.OddsClient.__module__ == "client.odds"
    assert client.RuleChecker.__module__ == "client.rules"
