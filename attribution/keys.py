"""Redis key names of the attribution edge, as the shared contract of issue 12 fixes them.

Only the names the webhook dispatcher reads live here for now; the
attribution branch owns this module and adds the rest (the merge reconciles).
"""

from __future__ import annotations

CONVERSIONS_STREAM = "og:conversions"  # field `c`: canonical JSON of a conversion record


def click_key(click_id: str) -> str:
    """The click index: a hash of the click record's fields (`subs` a JSON string)."""
    return f"og:click:{click_id}"
