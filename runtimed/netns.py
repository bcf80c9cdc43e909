"""Network namespaces for containers, made with pyroute2.

Every container gets its own netns, created here and joined by runc by path
(so CRIU sees it as external and a restored container can join a new one).
With network on (the default, as in Modal) the netns has a veth into the host
bridge `rtd0` and outbound traffic is masqueraded; `block_network=True` gives a
netns with only loopback.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

log = logging.getLogger(__name__)

BRIDGE = "rtd0"
SUBNET = ipaddress.ip_network("10.88.0.0/16")
GATEWAY = ipaddress.ip_address("10.88.0.1")
NETNS_DIR = "/var/run/netns"
PREFIX = "rtd-"
LEASE_DIR = "/run/runtimed/ip-leases"


@dataclass(frozen=True)
class NetnsHandle:
    name: str
    path: str
    address: str | None     # None when network is blocked
    host_veth: str | None


class NetworkManager:
    """Allocates addresses and creates/destroys per-container network namespaces."""

    def __init__(self, owner: str = "node", pool_size: int = 3) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._next = 2 + secrets.randbelow(SUBNET.num_addresses - 4)
        self._host_ready = False
        # Several node daemons may share one machine (tests, the multi-node demo):
        # addresses are claimed with O_EXCL files so they never hand out the same one.
        self.owner = owner
        self.prefix = PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:6] + "-"
        os.makedirs(LEASE_DIR, exist_ok=True)
        self.pool_size = pool_size
        self._pool: dict[bool, list[NetnsHandle]] = {True: [], False: []}
        self._closed = False           # drained for shutdown: refills stop
        self._refill_thread: threading.Timer | None = None
        self._refilling = False

    def _ensure_host(self) -> None:
        if self._host_ready:
            return
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=BRIDGE):
                ipr.link("add", ifname=BRIDGE, kind="bridge")
                idx = ipr.link_lookup(ifname=BRIDGE)[0]
                ipr.addr("add", index=idx, address=str(GATEWAY), mask=SUBNET.prefixlen)
            idx = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.link("set", index=idx, state="up")
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        _iptables_ensure(["-t", "nat", "POSTROUTING", "-s", str(SUBNET), "!", "-o", BRIDGE,
                          "-j", "MASQUERADE"])
        _iptables_ensure(["FORWARD", "-i", BRIDGE, "-j", "ACCEPT"])
        _iptables_ensure(["FORWARD", "-o", BRIDGE, "-m", "conntrack", "--ctstate",
                          "RELATED,ESTABLISHED", "-j", "ACCEPT"])
        # Containers must not reach the node's own services (daemon API, metadata).
        _iptables_ensure(["INPUT", "-i", BRIDGE, "-m", "conntrack", "--ctstate", "NEW",
                          "-j", "DROP"])
        self._host_ready = True

    def _alloc(self) -> int:
        with self._lock:
            for _ in range(SUBNET.num_addresses):
                n = self._next
                self._next = 2 if self._next >= SUBNET.num_addresses - 2 else self._next + 1
                if n not in self._used and self._claim(n):
                    self._used.add(n)
                    return n
        raise RuntimeError("no free container addresses in " + str(SUBNET))

    def _claim(self, n: int) -> bool:
        try:
            fd = os.open(os.path.join(LEASE_DIR, str(n)), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
        except FileExistsError:
            return False
        os.write(fd, self.owner.encode())
        os.close(fd)
        return True

    def _unclaim(self, n: int) -> None:
        try:
            os.unlink(os.path.join(LEASE_DIR, str(n)))
        except FileNotFoundError:
            pass

    # -- pool: namespaces are made ahead of demand, off the cold-start path --------------
    def acquire(self, *, network: bool) -> NetnsHandle:
        """A ready netns: from the pool when one is there, else made now."""
        handle = self.try_pooled(network=network)
        if handle is None:
            handle = self.create(secrets.token_hex(6), network=network)
            self.refill_async()
        return handle

    def try_pooled(self, *, network: bool) -> NetnsHandle | None:
        """A pooled netns or None, without blocking: cheap enough for the event loop, so
        the common case costs no executor hop (1-5 ms under load, measured as the
        `netns` span of restores)."""
        pool = self._pool[network]
        with self._lock:
            handle = pool.pop() if pool else None
        if handle is not None and not os.path.exists(handle.path):
            # Gone under us: release its lease off this (maybe event-loop) thread.
            threading.Thread(target=self.destroy, args=(handle,), daemon=True).start()
            handle = None
        self.refill_async()
        return handle

    def refill_async(self, delay: float = 0.5) -> None:
        with self._lock:
            if self._refilling or self.pool_size <= 0 or self._closed:
                return
            self._refilling = True
        # Start a little later: a refill competing for the CPU with the restore or
        # start that just took a netns would slow exactly the path the pool speeds up.
        t = threading.Timer(delay, self._refill)
        t.daemon = True
        self._refill_thread = t
        t.start()

    def _refill(self) -> None:
        try:
            for network in (True, False):
                while len(self._pool[network]) < self.pool_size and not self._closed:
                    h = self.create(secrets.token_hex(6), network=network)
                    with self._lock:
                        if not self._closed:
                            self._pool[network].append(h)
                            continue
                    self.destroy(h)        # drained while it was being made (shutdown)
        except Exception as e:  # noqa: BLE001 - the pool is an optimization
            log.warning("netns pool refill failed: %s", e)
        finally:
            with self._lock:
                self._refilling = False

    def drain(self) -> None:
        """Shutdown: destroy the pooled namespaces; a refill under way stops and cleans
        up what it makes (else its netns and lease outlive the daemon)."""
        with self._lock:
            self._closed = True
            refill = self._refill_thread
        if refill is not None:
            refill.cancel()                # not started yet: never starts
            if refill.is_alive():
                refill.join(timeout=10)    # mid-create: it destroys what it made
        with self._lock:
            handles = self._pool[True] + self._pool[False]
            self._pool = {True: [], False: []}
        for h in handles:
            self.destroy(h)

    def create(self, key: str, *, network: bool) -> NetnsHandle:
        name = self.prefix + key[-12:]
        if os.path.exists(os.path.join(NETNS_DIR, name)):
            self._remove_ns(name)
        netns.create(name)
        claimed: int | None = None
        try:
            if not network:
                with NetNS(name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                return NetnsHandle(name, os.path.join(NETNS_DIR, name), None, None)
            self._ensure_host()
            n = self._alloc()
            claimed = n
            addr = str(SUBNET.network_address + n)
            host_if, peer_if = f"rtv{key[-10:]}", f"rtp{key[-10:]}"
            with IPRoute() as ipr:
                ipr.link("add", ifname=host_if, kind="veth", peer=peer_if)
                hidx = ipr.link_lookup(ifname=host_if)[0]
                mtu = _uplink_mtu(ipr)
                ipr.link("set", index=hidx, mtu=mtu)
                bidx = ipr.link_lookup(ifname=BRIDGE)[0]
                ipr.link("set", index=hidx, master=bidx, state="up")
                pidx = ipr.link_lookup(ifname=peer_if)[0]
                ipr.link("set", index=pidx, net_ns_fd=name)
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                pidx = ns.link_lookup(ifname=peer_if)[0]
                ns.link("set", index=pidx, ifname="eth0", mtu=mtu)
                ns.addr("add", index=pidx, address=addr, mask=SUBNET.prefixlen)
                ns.link("set", index=pidx, state="up")
                ns.route("add", dst="default", gateway=str(GATEWAY))
            return NetnsHandle(name, os.path.join(NETNS_DIR, name), addr, host_if)
        except Exception:
            self._remove_ns(name)
            if claimed is not None:
                with self._lock:
                    self._used.discard(claimed)
                self._unclaim(claimed)
            raise

    def destroy(self, handle: NetnsHandle) -> None:
        if handle.host_veth:
            try:
                with IPRoute() as ipr:
                    idx = ipr.link_lookup(ifname=handle.host_veth)
                    if idx:
                        ipr.link("del", index=idx[0])
            except Exception as e:  # the veth dies with the netns anyway
                log.debug("veth %s: %s", handle.host_veth, e)
        if handle.address:
            n = int(ipaddress.ip_address(handle.address)) - int(SUBNET.network_address)
            with self._lock:
                self._used.discard(n)
            self._unclaim(n)
        self._remove_ns(handle.name)

    @staticmethod
    def _remove_ns(name: str) -> None:
        try:
            netns.remove(name)
        except OSError as e:
            log.debug("netns %s: %s", name, e)

    def cleanup_stale(self) -> int:
        """Remove what a previous daemon of this owner left behind (crash, kill -9):
        its network namespaces (named with the owner's prefix) and address leases."""
        n = 0
        names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
        for name in names:
            if name.startswith(self.prefix):
                self._remove_ns(name)
                n += 1
        for lease in os.listdir(LEASE_DIR):
            try:
                with open(os.path.join(LEASE_DIR, lease)) as f:
                    if f.read() == self.owner:
                        os.unlink(os.path.join(LEASE_DIR, lease))
            except OSError:
                pass
        return n


def _uplink_mtu(ipr: IPRoute) -> int:
    """The host's default-route MTU: a bigger veth MTU stalls TLS downloads (PMTU)."""
    try:
        route = ipr.route("get", dst="1.1.1.1")[0]
        oif = route.get_attr("RTA_OIF")
        return min(1500, int(ipr.link("get", index=oif)[0].get_attr("IFLA_MTU")))
    except Exception:
        return 1500


def _iptables_ensure(rule: list[str]) -> None:
    table: list[str] = []
    if rule[0] == "-t":
        table, rule = rule[:2], rule[2:]
    chain, body = rule[0], rule[1:]
    check = subprocess.run(["iptables", "-w", *table, "-C", chain, *body],
                           capture_output=True)
    if check.returncode != 0:
        subprocess.run(["iptables", "-w", *table, "-A", chain, *body], check=True,
                       capture_output=True)
