"""`oddsgate demo`: a whole node on this machine, a feed, players, watched live.

It starts `oddsgate run --haproxy` (supervisor, one worker per core, the
embedded Redis, HAProxy in front), a synthetic feed, and a crowd of players
built on the client library that connect through HAProxy. It prints a short
header (what runs where, the player shell's and /metrics' URLs, the commands
to try in another terminal) and then what the players see (events delivered,
publish-to-receipt latency, resumes, PROTOCOL.md section 5 violations:
always 0) and how the node spreads them over its workers:

- on a terminal, one status line rewritten in place every second;
- otherwise (a pipe, CI), one line a second, `t=...`, each kept.

The node's log (supervisor, workers, HAProxy) goes to `node.log` and the
demo's own to `demo.log`, both in the runtime directory the header names,
in OG_LOG_FORMAT; nothing but the header and the status reach the terminal.
`oddsgate drain --worker 0` with the same OG_RUNTIME_DIR shows players moving.

Partners (issue 12): the header names the partner dashboard (`/partner/`)
with a partner session token, and when the node answers `/t/` (probed once:
attribution/synthetic_partners.py) a few synthetic partners click their links
and convert meanwhile, so the dashboard moves; otherwise one header line says
why partner traffic is off. The node gets the keys that needs (admin API,
click ids, client hashes), fresh per demo unless the environment sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import uvloop

from attribution import synthetic_partners
from client.odds import OddsClient
from feed.publisher import Publisher
from feed.synthetic import SyntheticFeed
from gateway.auth import issue_token
from gateway.topics import PartitionMap
from redis_contract import target
from supervisor import logformat
from supervisor.control import ControlUnavailable, request
from supervisor.private import open_log, private_dir
from supervisor.settings import NodeSettings

NODE_LOG = "node.log"
DEMO_LOG = "demo.log"


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def _wait_for_node(control: Path, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"oddsgate run exited with {proc.returncode}")
        with contextlib.suppress(ControlUnavailable, OSError, TimeoutError):
            status = request(control, {"cmd": "status"}, timeout=5)
            haproxy = status.get("haproxy") or {}
            if all(w["agent"] == "up ready" for w in status["workers"]) and haproxy \
                    and set(haproxy.values()) == {"UP"}:
                return status
        time.sleep(0.2)
    raise RuntimeError("the node did not become ready")


@dataclass
class Place:
    """Where the demo's pieces run, for the header."""

    runtime: Path
    port: int
    metrics: str  # the /metrics URL, or "" when OG_METRICS_PORT=0
    redis_url: str
    admin_key: str = ""  # the node's OG_ADMIN_KEY: the synthetic partners create links

    @property
    def players_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def _command() -> str:
    """How the user runs `oddsgate`: the venv's script, relative to here when it can be."""
    script = Path(sys.executable).with_name("oddsgate")
    if not script.exists():
        return "oddsgate"
    with contextlib.suppress(ValueError):
        return str(script.absolute().relative_to(Path.cwd()))
    return str(script)


def header(place: Place, status: dict, *, players: int, rate: float, shell_url: str,
           partner_url: str = "", partner_traffic: str = "") -> str:
    """What runs where, the URLs, the commands to try: printed once, above the status."""
    workers = status["workers"]
    ports = f"{workers[0]['port']}-{workers[-1]['port']}" if len(workers) > 1 \
        else str(workers[0]["port"])
    og = f"OG_RUNTIME_DIR={place.runtime} {_command()}"
    dashboard = "import deploy/grafana/oddsgate.json into Grafana, scraping it"
    lines = [
        f"oddsgate demo: a node on this machine, a synthetic feed at {rate:.0f} events/s, "
        f"{players} players",
        f"  node      supervisor, {len(workers)} workers on 127.0.0.1:{ports}, "
        f"HAProxy on 127.0.0.1:{place.port}, Redis {place.redis_url}",
        f"  players   {place.players_url}",
        f"  shell     {shell_url}",
        *([f"  partners  {partner_url}"] if partner_url else []),
        *([f"            {partner_traffic}"] if partner_traffic else []),
        f"  metrics   {place.metrics} ({dashboard})" if place.metrics
        else "  metrics   off (OG_METRICS_PORT=0)",
        f"  logs      {place.runtime / NODE_LOG} (node, workers, HAProxy), "
        f"{place.runtime / DEMO_LOG}",
        f"  try       {og} status",
        f"            {og} drain --worker 0   (its players move; then undrain)",
        f"            {og} reload   (every worker replaced, nobody dropped)",
        "  Ctrl-C stops it.",
    ]
    return "\n".join(lines)


@dataclass
class Tick:
    """One second of what the players saw and how the node spreads them."""

    elapsed_s: float
    players: int
    delivered: int  # events the players received this second
    p50_ms: float
    p99_ms: float
    resumes: int
    resets: int
    violations: int
    workers: list[dict] | None  # the node's status, None when it did not answer

    def line(self) -> str:
        """The non-terminal report: one line a second, kept (tests and CI read these)."""
        spread = ("node unreachable" if self.workers is None else
                  " ".join(f"w{w['index']}:{w['connections']}({w['agent'].split()[-1]})"
                           for w in self.workers))
        return (f"t={self.elapsed_s:5.1f}s delivered={self.delivered:6d}/s "
                f"latency p50={self.p50_ms:6.2f}ms p99={self.p99_ms:6.2f}ms "
                f"resumes={self.resumes} resets={self.resets} "
                f"violations={self.violations} | {spread}")

    def status(self) -> str:
        """The terminal's status line, rewritten in place."""
        spread = ("node unreachable" if self.workers is None else
                  "  ".join(f"w{w['index']} {w['phase']} {w['connections']}"
                            for w in self.workers))
        return (f"{self.players} players | {self.delivered:,} deliveries/s | "
                f"p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms | "
                f"resumes {self.resumes} resets {self.resets} "
                f"violations {self.violations} | {spread}")


class StatusOutput:
    """One status line rewritten in place on a terminal; one line per tick elsewhere."""

    def __init__(self, out: IO[str], live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self._shown = False

    def print(self, text: str) -> None:
        """A line that stays (the header): above the status line, if one is shown."""
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()

    def tick(self, tick: Tick) -> None:
        if not self.live:
            self.print(tick.line())
            return
        width = shutil.get_terminal_size((120, 24)).columns or 120  # a pty may say 0
        text = tick.status()
        if len(text) >= width:  # a wrapped line could not be rewritten in place
            text = text[:max(1, width - 2)] + "…"
        self.out.write("\r\x1b[2K" + text)
        self.out.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.out.write("\n")
            self.out.flush()
            self._shown = False

    def _clear(self) -> None:
        if self._shown:
            self.out.write("\r\x1b[2K")
            self._shown = False


async def _watch(args: argparse.Namespace, place: Place, secret: str, status: dict,
                 output: StatusOutput) -> None:
    control = place.runtime / "control.sock"
    pmap = PartitionMap.load(None)
    redis = target.async_client(place.redis_url)
    feed = SyntheticFeed(Publisher(redis, pmap), pmap, seed=1, rate=args.rate)
    await feed.publish_opening_prices()  # listed before anyone follows them, as an aggregator does
    topics = feed.topics_by_popularity()[:40]
    rng = random.Random(2)
    players = []
    for i in range(args.clients):
        player = OddsClient(place.players_url,
                            token=issue_token(secret, f"demo-{i}", secrets.token_hex(4)),
                            record_latency=True)
        await player.connect()
        await player.subscribe(rng.sample(topics, k=min(5, len(topics))))
        players.append(player)
    shell_token = issue_token(secret, "demo-shell", secrets.token_hex(4), 86400.0)
    shell_url = (f"http://127.0.0.1:{args.port}/?token={shell_token}"
                 f"&topics={','.join(topics[:6])}")
    http_url = f"http://127.0.0.1:{args.port}"
    partner = synthetic_partners.PARTNER_IDS[0]
    partner_token = issue_token(secret, f"demo-partner-{partner}", secrets.token_hex(4), 86400.0,
                                partner=partner)
    stop = asyncio.Event()
    partners_task = None
    try:
        await synthetic_partners.probe_partners(http_url, place.admin_key)
    except synthetic_partners.PartnerTrafficOff as exc:
        partner_traffic = f"partner traffic off: {exc}"
    else:
        partner_traffic = (f"synthetic partners {', '.join(synthetic_partners.PARTNER_IDS)} "
                           "clicking and converting")
        partners_task = asyncio.create_task(
            synthetic_partners.drive_partners(http_url, place.redis_url, stop))
    output.print(header(place, status, players=len(players), rate=args.rate,
                        shell_url=shell_url,
                        partner_url=f"{http_url}/partner/?token={partner_token}",
                        partner_traffic=partner_traffic))
    feed_task = asyncio.create_task(feed.run(duration=args.duration))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    last_events = 0
    started = time.monotonic()
    while not stop.is_set() and not feed_task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        samples: list[int] = []
        for player in players:
            samples.extend(player.latencies_ns)
            player.latencies_ns.clear()
        events = sum(p.stats.events for p in players)
        try:
            workers = (await asyncio.to_thread(request, control, {"cmd": "status"}, 5))["workers"]
        except (ControlUnavailable, OSError, TimeoutError):
            workers = None
        output.tick(Tick(
            elapsed_s=time.monotonic() - started, players=len(players),
            delivered=events - last_events,
            p50_ms=_percentile(samples, 0.5), p99_ms=_percentile(samples, 0.99),
            resumes=sum(p.stats.resumes for p in players),
            resets=sum(p.stats.resets for p in players),
            violations=sum(len(p.violations) for p in players), workers=workers))
        last_events = events
    output.close()
    feed.stop()
    stop.set()
    await asyncio.gather(feed_task, *([partners_task] if partners_task else []),
                         return_exceptions=True)
    for player in players:
        await player.close()
    await redis.aclose()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def _attribution_keys() -> dict[str, str]:
    """The attribution settings the node needs for /t/, conversions and the admin API:
    the environment's when set, else fresh ones for this demo (every worker of the node
    gets the same, so any of them verifies a click id another minted)."""
    env = os.environ
    fresh = {"OG_ADMIN_KEY": secrets.token_urlsafe(24),
             "OG_CLICK_KEYS": f"demo:{secrets.token_urlsafe(24)}",
             "OG_CLIENT_HASH_KEY": secrets.token_urlsafe(24)}
    return {name: env.get(name) or value for name, value in fresh.items()}


def run_demo(args: argparse.Namespace) -> int:
    runtime = private_dir(os.environ.get("OG_RUNTIME_DIR")
                          or f"/tmp/oddsgate-demo-{os.getuid()}")
    secret = os.environ.get("OG_JWT_SECRET") or secrets.token_hex(16)
    node_settings = NodeSettings.from_env()
    attribution = _attribution_keys()
    place = Place(
        runtime=runtime, port=args.port,
        metrics=(f"http://{node_settings.metrics_host}:{node_settings.metrics_port}/metrics"
                 if node_settings.metrics_port else ""),
        redis_url=f"unix://{runtime / 'redis' / 'redis.sock'}",
        admin_key=attribution["OG_ADMIN_KEY"])
    # The demo's own log lines (the client library's, the feed's) go to a file too:
    # the terminal keeps the header and the status line.
    demo_log = io.TextIOWrapper(open_log(runtime / DEMO_LOG), line_buffering=True)
    logformat.configure(logformat.configured_format(), stream=demo_log, role="demo")
    output = StatusOutput(sys.stdout)
    env = {**os.environ, "OG_RUNTIME_DIR": str(runtime), "OG_JWT_SECRET": secret,
           "OG_HAPROXY_BIND": f"127.0.0.1:{args.port}", "PYTHONUNBUFFERED": "1",
           # the statistics service, so the partner dashboard the header prints is live
           "OG_STATS": os.environ.get("OG_STATS") or "1",
           **attribution}
    env.pop("OG_REDIS_URL", None)  # the node's own embedded Redis
    node_log = runtime / NODE_LOG
    output.print(f"oddsgate demo: starting a node (its log: {node_log})")
    with open_log(node_log) as log_file:
        node = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                                env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        try:
            status = _wait_for_node(runtime / "control.sock", node)
        except RuntimeError as exc:
            print(f"oddsgate demo: {exc}; the end of {node_log}:\n{_log_tail(node_log)}",
                  file=sys.stderr)
            return 1
        uvloop.run(_watch(args, place, secret, status, output))
    finally:
        output.close()
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        logformat.configure(logformat.configured_format(), role="demo")  # off the file
        demo_log.close()
    return 0
