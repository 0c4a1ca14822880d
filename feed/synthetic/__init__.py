"""A synthetic odds feed: deterministic from a seed, paced, bounded.

It exists so the gateway can be tested and benchmarked against a feed whose
shape resembles the real one. Three parts, each usable alone:

* `model.py`: the markets and their seeded update stream (no clock, no Redis);
* `pacing.py`: `SyntheticFeed`, the model published at a rate, with a spike;
* `cli.py`: `oddsgate feed` / `python -m feed.synthetic`.

The names below are the feed's API (the bench, the demo and the tests use
them from here).
"""

from feed.synthetic.cli import main
from feed.synthetic.model import ZIPF_EXPONENT, MarketModel, SyntheticMarket
from feed.synthetic.pacing import FeedReport, FeedResult, Spike, SyntheticFeed

__all__ = [
    "ZIPF_EXPONENT",
    "FeedReport",
    "FeedResult",
    "MarketModel",
    "Spike",
    "SyntheticFeed",
    "SyntheticMarket",
    "main",
]
