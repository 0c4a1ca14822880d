"""Standard Webhooks signatures, made by the specification's own Python package.

`webhook-signature` holds one `v1,<base64>` per secret: during a rotation
the new secret's and the old one's, so a partner verifies with either
while it switches over (the reference verifier accepts any match).
"""

from __future__ import annotations

from datetime import UTC, datetime

from standardwebhooks import Webhook


def signed_headers(webhook_id: str, body: str, secrets: list[str], now_s: float) -> dict[str, str]:
    """The three headers of one attempt, signed at `now_s` with every secret given."""
    timestamp = datetime.fromtimestamp(int(now_s), UTC)
    signatures = " ".join(Webhook(secret).sign(webhook_id, timestamp, body) for secret in secrets)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(int(now_s)),
            "webhook-signature": signatures, "content-type": "application/json"}
