"""What one load-generator process counts, shared by all its connections.

`deliveries`, `frames` and the latency histogram cover the current
measurement interval (`reset()` starts one); violations, errors and resets
count over the whole run, since a single one is worth reporting.
"""

from __future__ import annotations

from bench.hist import Histogram

# PROTOCOL.md §5 rules as the load generator checks them, frame by frame.
SEQ_ORDER = "seq_order"  # seq repeated or went down within an epoch (rule 1)
SILENT_GAP = "silent_gap"  # seqs skipped without "coalesced": true (rule 3)
EPOCH = "epoch"  # an event of another epoch with no reset before it
UNEXPECTED = "unexpected"  # an event before its topic's snapshot
BAD_SNAPSHOT = "bad_snapshot"  # a snapshot market newer than the snapshot, or of another epoch


class Counters:
    def __init__(self) -> None:
        self.latency = Histogram()  # publish-to-receipt, per event
        self.subscribe = Histogram()  # subscribe sent -> snapshot received, per topic
        self.connect = Histogram()  # TCP connect started -> usable (welcome, namespace, PONG)
        self.deliveries = 0
        self.frames = 0
        self.bytes_in = 0
        self.coalesced = 0
        self.violations: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.resets = 0
        self.reconnect_frames = 0
        self.lost = 0  # connections that closed while the bench still wanted them

    def reset(self) -> None:
        self.latency.clear()
        self.deliveries = 0
        self.frames = 0
        self.bytes_in = 0
        self.coalesced = 0

    def violate(self, rule: str) -> None:
        self.violations[rule] = self.violations.get(rule, 0) + 1

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def to_dict(self) -> dict:
        return {
            "latency": self.latency.to_sparse(),
            "subscribe": self.subscribe.to_sparse(),
            "connect": self.connect.to_sparse(),
            "deliveries": self.deliveries,
            "frames": self.frames,
            "bytes_in": self.bytes_in,
            "coalesced": self.coalesced,
            "violations": dict(self.violations),
            "errors": dict(self.errors),
            "resets": self.resets,
            "reconnect_frames": self.reconnect_frames,
            "lost": self.lost,
        }


def merge(parts: list[dict]) -> dict:
    """Sum the `to_dict()` of several processes; histograms come back as Histogram."""
    out: dict = {
        "latency": Histogram(),
        "subscribe": Histogram(),
        "connect": Histogram(),
        "violations": {},
        "errors": {},
    }
    for part in parts:
        for name in ("latency", "subscribe", "connect"):
            out[name].merge(Histogram.from_sparse(part[name]))
        for name in ("violations", "errors"):
            for key, value in part[name].items():
                out[name][key] = out[name].get(key, 0) + value
        for name in ("deliveries", "frames", "bytes_in", "coalesced", "resets",
                     "reconnect_frames", "lost"):
            out[name] = out.get(name, 0) + part[name]
    return out
