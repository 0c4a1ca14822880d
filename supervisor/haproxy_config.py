"""`oddsgate haproxy-config`: the HAProxy file for an SRE's own HAProxy.

Its defaults are the node's (supervisor/settings.py: worker ports, the
agent port, the frontend address), so a file rendered with no flags points
HAProxy at the ports a default `oddsgate run` listens on; the stats socket
defaults to the node's runtime dir, as the supervisor uses it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from haproxy.check import check
from haproxy.errors import HAProxyConfigError, HAProxyError
from haproxy.render import render
from haproxy.settings import LOG_FORMATS, LOG_LEVELS, HAProxySettings, NodeTarget
from supervisor.private import write_private
from supervisor.settings import NodeSettings

STATS_SOCKET_NAME = "haproxy.sock"


def _host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _default_stats_socket() -> str:
    """The node's runtime dir (OG_RUNTIME_DIR and friends), as the supervisor uses it."""
    from gateway.config import Settings
    from supervisor.runtime import runtime_dir

    return str(runtime_dir(Settings.from_env(allow_anonymous=True)) / STATS_SOCKET_NAME)


def _default_log_format() -> str:
    """OG_LOG_FORMAT, as the node's own HAProxy would log."""
    from gateway.config import Settings

    return str(Settings.env_value("log_format"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags, on its subparser of `oddsgate`."""
    node = NodeSettings()  # the declared defaults, not the environment's
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="number of gateway workers (default: CPU count)")
    parser.add_argument("--base-port", type=int, default=node.base_port,
                        help="port of worker 0; worker i listens on base + i")
    parser.add_argument("--click-base-port", type=int,
                        help="port of worker 0's click listener (GET /t/); worker i's is "
                        "this + i (default: right after the worker ports, as a node does)")
    parser.add_argument("--worker-host", default="127.0.0.1", help="address workers listen on")
    parser.add_argument("--bind", type=_host_port, default=node.bind,
                        metavar="HOST:PORT", help="where players connect")
    parser.add_argument("--agent-host", default="127.0.0.1",
                        help="address of the supervisor's agent-check port")
    parser.add_argument("--agent-port", type=int, default=node.agent_port,
                        help="the supervisor's agent-check port")
    parser.add_argument("--stats-socket", help="HAProxy's admin socket "
                        "(default: haproxy.sock in the node's runtime dir)")
    parser.add_argument("--state-file", help="server state file for reloads (default: none)")
    parser.add_argument("--maxconn", type=int, default=100_000, help="players, node-wide")
    parser.add_argument("--server-maxconn", type=int, help="players per worker (default: none)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="request log layout (default: OG_LOG_FORMAT, else text)")
    parser.add_argument("--node", action="append", type=_node, metavar="NAME=HOST:BASE:N:AGENT:NUM",
                        help="a node behind this HAProxy (repeat for each; its workers on "
                        "BASE..BASE+N-1, its agent on AGENT, NUM 1-64 fixing its place on the "
                        "hash ring; its click listeners right after its worker ports); replaces "
                        "--workers/--base-port/--click-base-port/--worker-host/--agent-*")
    parser.add_argument("--output", "-o", help="write to FILE instead of stdout")
    parser.add_argument("--check", action="store_true", help="run `haproxy -c` on the result")
    parser.add_argument("--haproxy", help="haproxy binary for --check")


def _node(text: str) -> NodeTarget:
    try:
        return NodeTarget.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """0 done; 2 a setting or a config HAProxy refuses; 1 HAProxy missing or a file unwritable."""
    try:
        bind_host, bind_port = args.bind
        common = {"bind_host": bind_host, "bind_port": bind_port,
                  "stats_socket": args.stats_socket or _default_stats_socket(),
                  "state_file": args.state_file, "maxconn": args.maxconn,
                  "server_maxconn": args.server_maxconn, "log_level": args.log_level,
                  "log_format": args.log_format or _default_log_format()}
        if args.node:
            settings = HAProxySettings.for_nodes(args.node, **common)
        else:
            settings = HAProxySettings.for_workers(
                args.workers, args.base_port, args.click_base_port,
                worker_host=args.worker_host,
                agent_host=args.agent_host, agent_port=args.agent_port, **common)
        text = render(settings)
        if args.check:
            check(text, haproxy=args.haproxy)
    except (ValueError, HAProxyConfigError) as exc:  # ConfigError is a ValueError
        print(f"oddsgate haproxy-config: {exc}", file=sys.stderr)
        return 2
    except HAProxyError as exc:
        print(f"oddsgate haproxy-config: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            # an SRE's file, read by an HAProxy that may run as another user
            write_private(Path(args.output).resolve(), text, mode=0o644)
        except OSError as exc:
            print(f"oddsgate haproxy-config: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0
