"""What an operator does to endpoints and dead letters, once for the CLI and the admin API.

`oddsgate webhooks ...` (webhooks/cli.py) and `/admin/webhooks...` on a
worker (attribution/admin.py) both call these, so the two interfaces cannot
drift: the same checks, the same Redis steps (webhooks/store.py), the same
rows. Each raises `OperationError` (a bad field or an unknown id, its
message naming which) for the caller to turn into exit 2 or an HTTP 4xx.
"""

from __future__ import annotations

import time

from webhooks.endpoints import EndpointError, new_endpoint, rotate
from webhooks.settings import WebhookSettings
from webhooks.store import HookStore


class OperationError(ValueError):
    """`field` names what was wrong; `status` is the HTTP answer (400 or 404)."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


async def add(store: HookStore, partner: str, *, url: str | None = None,
              postback: str | None = None, events: str | None = None) -> dict:
    """A new endpoint; its row, plus `secret` for a webhook (shown once)."""
    if bool(url) == bool(postback):
        raise OperationError("give exactly one of url (a webhook) or postback", "url")
    try:
        endpoint = new_endpoint(partner, url=url, postback=postback, events=events,
                                now_s=time.time())
    except EndpointError as exc:
        raise OperationError(str(exc), "endpoint") from None
    await store.save_endpoint(endpoint)
    row = await _row(store, endpoint)
    if endpoint.secrets:
        row["secret"] = endpoint.secrets[0].secret
    return row


async def rows(store: HookStore) -> list[dict]:
    """Every endpoint with its counters and breaker state, sorted by id."""
    endpoints = sorted((await store.endpoints()).values(), key=lambda e: e.id)
    return [await _row(store, e) for e in endpoints]


async def set_enabled(store: HookStore, endpoint_id: str, enabled: bool) -> dict:
    endpoint = await _endpoint(store, endpoint_id)
    endpoint.enabled = enabled
    endpoint.disabled_reason = None if enabled else "by an operator"
    await store.save_endpoint(endpoint)
    return await _row(store, endpoint)


async def rotate_secret(store: HookStore, endpoint_id: str) -> tuple[dict, str, float]:
    """A new secret (the row, the secret, the overlap in seconds the old one still signs)."""
    endpoint = await _endpoint(store, endpoint_id)
    overlap = float(WebhookSettings.env_value("rotation_overlap_s"))  # type: ignore[arg-type]
    try:
        secret = rotate(endpoint, overlap, time.time())
    except EndpointError as exc:
        raise OperationError(str(exc), "endpoint") from None
    await store.save_endpoint(endpoint)
    return await _row(store, endpoint), secret, overlap


async def dead_letters(store: HookStore, partner: str | None = None) -> list[dict]:
    return await store.dead_letters(partner)


async def replay(store: HookStore, webhook_id: str | None = None,
                 partner: str | None = None) -> list[str]:
    """Dead letters due again with their original webhook-id; the ids moved."""
    if bool(webhook_id) == bool(partner):
        raise OperationError("give exactly one of webhook_id or partner", "webhook_id")
    ids = [webhook_id] if webhook_id else [
        d["webhook_id"] for d in await store.dead_letters(partner)]
    moved = await store.replay(ids, int(time.time() * 1000))  # type: ignore[arg-type]
    if webhook_id and not moved:
        raise OperationError(f"no dead letter {webhook_id!r}", "webhook_id", 404)
    return moved


async def _endpoint(store: HookStore, endpoint_id: str):
    endpoint = await store.endpoint(endpoint_id)
    if endpoint is None:
        raise OperationError(f"no endpoint {endpoint_id!r}", "endpoint", 404)
    return endpoint


async def _row(store: HookStore, endpoint) -> dict:
    stats = await store.stats(endpoint.id)
    return {"id": endpoint.id, "partner": endpoint.partner, "kind": endpoint.kind,
            "url": endpoint.url, "events": endpoint.events or ["*"],
            "state": "enabled" if endpoint.enabled else
            f"disabled: {endpoint.disabled_reason or 'by an operator'}",
            "secrets": len(endpoint.signing_secrets(time.time())),
            "delivered": int(stats.get("delivered", 0)), "failed": int(stats.get("failed", 0)),
            "retrying": int(stats.get("retrying", 0)), "dead": int(stats.get("dead", 0)),
            "breaker": stats.get("breaker", "closed")}
