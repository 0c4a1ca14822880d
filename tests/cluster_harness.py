"""A real Redis Cluster on loopback for the suite: masters (and replicas), made
with `redis-cli --cluster create`, killed, failed over and resharded by tests.

Each node is an EmbeddedRedis (its own directory, config and log), so every
server is stopped with the harness, and a test's failure shows their logs.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import redis

from supervisor.embedded_redis import EmbeddedRedis, ports_free

NODE_TIMEOUT_MS = 1000


def _cluster_ports(count: int) -> int:
    """A base port with `count` free ports after it, each with its cluster bus port
    (port + 10000) free too: Redis refuses ports above 55535 for that reason,
    so the kernel's ephemeral range is no use here."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 45000 - count)
        if ports_free(p for port in range(base, base + count) for p in (port, port + 10000)):
            return base
    raise RuntimeError("no free range of ports for a cluster")


class LocalCluster:
    """`masters` masters with `replicas` replicas each, slots spread evenly."""

    def __init__(self, root: Path, masters: int = 3, replicas: int = 0) -> None:
        self.root = root
        self.masters = masters
        self.replicas = replicas
        count = masters * (1 + replicas)
        base = _cluster_ports(count)
        self.nodes = [
            EmbeddedRedis(root / f"node-{base + i}", port=base + i, extra_config={
                "cluster-enabled": "yes",
                "cluster-config-file": f"nodes-{base + i}.conf",
                "cluster-node-timeout": str(NODE_TIMEOUT_MS),
                # A replica that lost its master for a while still takes over:
                # the tests kill masters on purpose.
                "cluster-replica-validity-factor": "0",
                "cluster-require-full-coverage": "yes",
                "cluster-allow-pubsubshard-when-down": "no",
            })
            for i in range(count)
        ]

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        self.wait_ok()
        if self.replicas:
            self._wait_replicas_synced()
        return self

    def _wait_replicas_synced(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with self.client(node.port) as c:
                    info = c.info("replication")
                if info["role"] == "slave":
                    states.append(info.get("master_link_status") == "up"
                                  and not info.get("master_sync_in_progress"))
            if all(states):
                return
            time.sleep(0.1)
        raise TimeoutError("replicas did not finish their first sync")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------

    @property
    def seeds(self) -> str:
        """What OG_REDIS_CLUSTER_NODES takes."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes if n.running)

    @property
    def url(self) -> str:
        return "redis-cluster://" + self.seeds

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    # -- state -------------------------------------------------------------

    def _shards(self, via: EmbeddedRedis | None = None) -> list[dict]:
        via = via or next(n for n in self.nodes if n.running)
        with self.client(via.port) as c:
            out = []
            for slots_from, slots_to, master, *replicas in c.execute_command("CLUSTER", "SLOTS"):
                out.append({"from": int(slots_from), "to": int(slots_to),
                            "master": int(master[1]), "replicas": [int(r[1]) for r in replicas]})
            return out

    def master_of(self, slot: int) -> int:
        for shard in self._shards():
            if shard["from"] <= slot <= shard["to"]:
                return shard["master"]
        raise LookupError(f"slot {slot} has no master")

    def masters_ports(self) -> list[int]:
        return sorted({s["master"] for s in self._shards()})

    def replica_of(self, master: int) -> int:
        """A live replica of `master`, from CLUSTER NODES (CLUSTER SLOTS may list a
        freshly moved slot before it lists the replicas beside it)."""
        master_id = self.node_id(master)
        with self.client(master) as c:
            table = c.execute_command("CLUSTER", "NODES").decode()
        for line in table.splitlines():
            fields = line.split()
            if len(fields) > 3 and "slave" in fields[2] and fields[3] == master_id \
                    and "fail" not in fields[2]:
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"{master} has no replica")

    def node_id(self, port: int) -> str:
        with self.client(port) as c:
            return c.execute_command("CLUSTER", "MYID").decode()

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Every live node says cluster_state:ok and agrees on who serves every slot."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                views = []
                for node in self.nodes:
                    if not node.running:
                        continue
                    with self.client(node.port) as c:
                        info = c.execute_command("CLUSTER", "INFO").decode()
                        if "cluster_state:ok" not in info:
                            raise RuntimeError(info)
                    views.append(sorted((s["from"], s["to"], s["master"])
                                        for s in self._shards(node)))
                if views and all(v == views[0] for v in views) and \
                        sum(t - f + 1 for f, t, _ in views[0]) == 16384:
                    return
                last = f"views differ: {views}"
            except (redis.RedisError, OSError, RuntimeError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ok within {timeout}s: {last}")

    # -- faults ------------------------------------------------------------

    def kill_master(self, port: int, timeout: float = 20.0, synced: bool = True) -> int:
        """SIGKILL a master and wait until its replica serves its slots; the new master.

        `synced`: first wait until the replica has every write (WAIT), so the
        failover itself loses nothing; without it the replica may be behind,
        as after a real crash, and the topic's state goes back in time."""
        replica = self.replica_of(port)
        if synced:
            with self.client(port) as c:
                if c.execute_command("WAIT", 1, 5000) < 1:
                    raise TimeoutError(f"replica {replica} of {port} did not catch up")
        self.node(port).crash()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client(replica) as c:
                    if c.execute_command("ROLE")[0] == b"master":
                        break
            except redis.RedisError:
                pass
            time.sleep(0.05)
        else:
            raise TimeoutError(f"replica {replica} of {port} not promoted")
        self.wait_ok(timeout)
        return replica

    def move_slot(self, slot: int, to_port: int, batch: int = 100) -> None:
        """Migrate one slot with its keys the way `redis-cli --cluster reshard` does:
        IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE everywhere."""
        src_port = self.master_of(slot)
        if src_port == to_port:
            return
        src_id, dst_id = self.node_id(src_port), self.node_id(to_port)
        with self.client(src_port) as src, self.client(to_port) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000,
                                    "REPLACE", "KEYS", *keys)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for port in self.masters_ports():
            if port not in (src_port, to_port):
                with self.client(port) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()

