"""sd_notify(3) to a real AF_UNIX datagram socket, as systemd listens for it.

A whole node announcing READY=1 and STOPPING=1 is tests/test_deploy.py's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_messages_are_one_datagram_each(listener) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.send("READY=1", "STATUS=2 of 2 workers serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 of 2 workers serving"


def test_abstract_socket_names() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"oddsgate-test-{os.getpid()}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier("@" + name).send("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_status_is_sent_when_it_changes_and_not_too_often(listener) -> None:
    sock, path = listener
    notifier = Notifier(path, status_interval_s=0.0)
    notifier.status("a")
    notifier.status("a")  # unchanged: not sent
    notifier.status("b")
    assert [sock.recv(4096), sock.recv(4096)] == [b"STATUS=a", b"STATUS=b"]
    slow = Notifier(path, status_interval_s=3600)
    slow.status("c")
    slow.status("d")  # changed, but within the interval
    assert sock.recv(4096) == b"STATUS=c"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_the_variable_is_taken_out_of_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}
    assert Notifier.from_environment(env).address == "/run/systemd/notify"
    assert env == {"PATH": "/bin"}  # children (workers, HAProxy) do not inherit it
    assert not Notifier.from_environment({}).enabled


def test_without_systemd_or_with_a_dead_socket_nothing_breaks(tmp_path: Path) -> None:
    assert Notifier(None).send("READY=1") is False
    assert Notifier(str(tmp_path / "nobody-listens")).send("READY=1") is False
