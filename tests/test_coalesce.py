"""The coalescing outbox (gateway/coalesce.py): PROTOCOL.md §5 for a slow player."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from client.rules import RuleChecker, verify_coalescing
from gateway.coalesce import CoalescingOutbox

TOPICS = ("odds:5:8", "odds:5:9")
MARKETS = ("5:8:1", "5:8:2", "5:8:3")


def _event(topic: str, seq: int, market: str, price: int) -> dict:
    return {"type": "odds", "topic": topic, "epoch": "e", "seq": seq, "market": market,
            "event_id": f"m-{market}", "ts": seq, "status": "open",
            "prices": {"home": f"{price}.00"}}


def test_newest_per_market_in_seq_order_with_coalesced_after_a_skip() -> None:
    outbox = CoalescingOutbox()
    outbox.start("t", 10)
    pushes = [(11, "a"), (12, "b"), (13, "a"), (14, "c"), (15, "b")]
    for seq, market in pushes:
        outbox.push("t", market, seq, orjson.dumps({"seq": seq, "market": market}))
    assert len(outbox) == 3 and outbox.superseded == 2
    out = [orjson.loads(e) for e in outbox.drain()]
    assert [(e["seq"], e.get("coalesced", False)) for e in out] == \
        [(13, True), (14, False), (15, False)]  # 11 and 12 superseded; 13..15 contiguous
    assert len(outbox) == 0 and outbox.sent_seq["t"] == 15


def test_no_skip_means_no_flag_and_forget_drops_a_topic() -> None:
    outbox = CoalescingOutbox()
    outbox.start("t", 0)
    outbox.start("u", 4)
    outbox.push("t", "a", 1, b'{"seq":1}')
    outbox.push("u", "a", 5, b'{"seq":5}')
    outbox.forget("u")
    assert outbox.drain() == [b'{"seq":1}']


# A run of a slow player: the feed publishes; the player is now keeping up
# (events go straight out), now over its high-water mark (events go to the
# outbox), and drains from time to time.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(TOPICS), st.sampled_from(MARKETS),
                  st.integers(1, 99)),
        st.tuples(st.just("pause")),
        st.tuples(st.just("resume")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_any_interleaving_of_pushes_and_drains_keeps_every_rule(ops) -> None:
    outbox = CoalescingOutbox()
    seqs = dict.fromkeys(TOPICS, 0)
    published: dict[str, list[dict]] = {t: [] for t in TOPICS}
    received: list[bytes] = []
    paused = False
    for op in (*ops, ("resume",)):
        if op[0] == "publish":
            _, topic, market, price = op
            seqs[topic] += 1
            event = _event(topic, seqs[topic], market, price)
            published[topic].append(event)
            raw = orjson.dumps(event)
            if paused:
                outbox.push(topic, market, seqs[topic], raw)
            else:
                received.append(raw)
        elif op[0] == "pause" and not paused:
            paused = True
            for topic in TOPICS:  # the player holds everything sent so far
                outbox.start(topic, seqs[topic])
        elif op[0] == "resume" and paused:
            paused = False
            received.extend(outbox.drain())

    checker = RuleChecker()
    checker.feed({"type": "subscribed", "topics": list(TOPICS)})
    for topic in TOPICS:
        checker.feed({"type": "snapshot", "topic": topic, "epoch": "e", "seq": 0,
                      "markets": []})
    decoded = [orjson.loads(e) for e in received]
    for event in decoded:
        checker.feed(event)
    assert checker.violations == []
    for topic in TOPICS:
        mine = [e for e in decoded if e["topic"] == topic]
        seqs_out = [e["seq"] for e in mine]
        assert seqs_out == sorted(set(seqs_out))  # strictly increasing
        assert verify_coalescing(mine, published[topic], after_seq=0) == []
        newest = {e["market"]: e["prices"] for e in published[topic]}
        last = {}
        for e in mine:
            last[e["market"]] = e["prices"]
        assert last == newest  # every market ends on its newest published state
