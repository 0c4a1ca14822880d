"""The two ways HAProxy work fails, shared by rendering, checking and the supervisor's launcher."""

from __future__ import annotations


class HAProxyError(RuntimeError):
    """HAProxy could not be found, started, reloaded or reached; the message says why."""


class HAProxyConfigError(HAProxyError):
    """`haproxy -c` refused a configuration; the message holds HAProxy's own output."""
