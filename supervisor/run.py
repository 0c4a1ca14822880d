"""`oddsgate run`: settings, the embedded Redis, then the supervisor until it stops."""

from __future__ import annotations

import argparse
import logging

import uvloop

from gateway.breaker import Breaker
from gateway.config import ConfigError, Settings
from gateway.topics import PartitionMap
from haproxy.settings import HAProxySettings
from supervisor.haproxy_config import STATS_SOCKET_NAME
from supervisor.metrics import AggregatorCollector, MetricsServer, WorkerInfo, fleet_registry
from supervisor.node import Phase, Supervisor
from supervisor.private import private_dir
from supervisor.runtime import redis_for, runtime_dir
from supervisor.sdnotify import Notifier
from supervisor.services import (
    AggregatorService,
    HAProxyService,
    StatsService,
    WebhookDispatcherService,
)
from supervisor.settings import NodeSettings

log = logging.getLogger("oddsgate.run")


def haproxy_settings(node: NodeSettings, runtime, log_format: str = "text") -> HAProxySettings:
    host, port = node.bind
    return HAProxySettings.for_workers(
        node.worker_count, node.base_port, node.click_ports[0], bind_host=host, bind_port=port,
        agent_port=node.agent_port, stats_socket=str(runtime / STATS_SOCKET_NAME),
        log_format=log_format,
    )


def worker_info(supervisor: Supervisor) -> list[WorkerInfo]:
    """What /metrics shows of each worker beside its slot's figures."""
    return [WorkerInfo(w.index, w.current.pid if w.current else None, w.restarts_total,
                       w.operator_drain or w.auto_drain, w.phase.value)
            for w in supervisor.workers]


def build_supervisor(node: NodeSettings, worker: Settings, redis_url: str,
                     notifier: Notifier | None = None) -> Supervisor:
    runtime = runtime_dir(worker)
    if node.haproxy:  # refused now, in one line, rather than once the workers are up
        private_dir(runtime / "haproxy")
    env = {"OG_REDIS_URL": redis_url}
    if worker.allow_anonymous:
        env["OG_ALLOW_ANONYMOUS"] = "1"
    breaker = Breaker(worker.breaker_trip_share, worker.breaker_recover_share,
                      worker.breaker_min_players)
    supervisor = Supervisor(node, env, runtime, breaker, notifier)
    aggregator = AggregatorService(redis_url, worker.region) if node.aggregate else None
    if aggregator is not None:
        supervisor.extra_services.append(aggregator)
    if node.webhooks:
        supervisor.extra_services.append(WebhookDispatcherService(redis_url))
    if node.stats:
        supervisor.extra_services.append(StatsService(redis_url, worker.region))
    if node.haproxy:
        supervisor.extra_services.append(
            HAProxyService(haproxy_settings(node, runtime, worker.log_format),
                           runtime / "haproxy"))
    if node.metrics_port:
        registry = fleet_registry(
            supervisor.table, lambda: worker_info(supervisor), supervisor.n,
            worker_of_slot=lambda slot: slot % supervisor.n,
        )
        if aggregator is not None:
            registry.register(AggregatorCollector(aggregator))
        supervisor.extra_services.insert(
            0, MetricsServer(node.metrics_host, node.metrics_port, registry))
    return supervisor


def run_node(args: argparse.Namespace) -> int:
    node = NodeSettings.from_env(
        workers=args.workers, base_port=args.base_port,
        haproxy=True if args.haproxy else None, haproxy_bind=args.bind,
    )
    worker = Settings.from_env(allow_anonymous=True if args.anonymous else None)
    if node.webhooks:  # a bad OG_WEBHOOKS_* stops the node now, not the dispatcher in a loop
        from webhooks.settings import WebhookSettings

        WebhookSettings.from_env()
    try:  # every worker would die on it: say so once, now
        PartitionMap.load(worker.partition_map)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"OG_PARTITION_MAP={worker.partition_map!r}: partition map: {exc}")\
            from None
    notifier = Notifier.from_environment()  # before any child could inherit NOTIFY_SOCKET
    with redis_for(worker) as url:
        supervisor = build_supervisor(node, worker, url, notifier)
        code = uvloop.run(supervisor.run())
    failed = [w.index for w in supervisor.workers if w.phase is Phase.FAILED]
    if failed:
        log.error("workers %s failed", failed)
    return code
