"""runtimed.bundle: the OCI config.json for one container (pure)."""
from __future__ import annotations

import dataclasses

import pytest

from runtimed.bundle import (DEFAULT_CAPS, BindMount, ContainerSpec, SpecError, build_config,
                             validate)


def spec(**kw) -> ContainerSpec:
    base = dict(container_id="ctr-0123456789ab", rootfs="/var/lib/x/rootfs",
                args=("python3", "-u", "/.runtimed/agent.py"))
    base.update(kw)
    return ContainerSpec(**base)


def test_capabilities_are_reduced():
    cfg = build_config(spec())
    caps = cfg["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for kind in ("bounding", "effective", "permitted"):
        got = set(caps[kind])
        assert got == set(DEFAULT_CAPS)
        for dangerous in ("CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_PTRACE",
                          "CAP_SYS_MODULE", "CAP_MKNOD", "CAP_SYS_RAWIO", "CAP_AUDIT_WRITE"):
            assert dangerous not in got
    # no ambient/inheritable sets that could hand capabilities to exec'd programs
    assert "ambient" not in caps and "inheritable" not in caps


def test_process_hardening():
    cfg = build_config(spec())
    proc = cfg["process"]
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["args"] == ["python3", "-u", "/.runtimed/agent.py"]
    nofile = [r for r in proc["rlimits"] if r["type"] == "RLIMIT_NOFILE"]
    assert nofile and nofile[0]["soft"] <= nofile[0]["hard"]
    linux = cfg["linux"]
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]
    sysfs = next(m for m in cfg["mounts"] if m["destination"] == "/sys")
    assert "ro" in sysfs["options"]
    # devices: deny everything, then allow the harmless standard ones only
    devs = linux["resources"]["devices"]
    assert devs[0] == {"allow": False, "access": "rwm"}
    allowed = {(d["type"], d["major"], d["minor"]) for d in devs[1:] if d["allow"]}
    assert ("c", 1, 3) in allowed and ("c", 1, 9) in allowed       # null, urandom
    assert not any(t == "b" for t, _, _ in allowed)                  # no block devices


def test_namespaces_and_netns_path():
    cfg = build_config(spec(netns_path="/var/run/netns/rtd-abcd-0123"))
    ns = {n["type"]: n for n in cfg["linux"]["namespaces"]}
    assert set(ns) == {"pid", "ipc", "uts", "mount", "network"}
    assert ns["network"]["path"] == "/var/run/netns/rtd-abcd-0123"
    assert "path" not in ns["pid"]
    # without a path: a fresh private network namespace (loopback only)
    cfg = build_config(spec())
    net = next(n for n in cfg["linux"]["namespaces"] if n["type"] == "network")
    assert "path" not in net
    # no user namespace and no host namespaces joined
    assert not any(n["type"] == "user" for n in cfg["linux"]["namespaces"])


def test_memory_cpu_pids_limits():
    cfg = build_config(spec(memory_mb=512, cpu=1.5, cpu_limit=2.0, pids_limit=100))
    res = cfg["linux"]["resources"]
    assert res["memory"] == {"limit": 512 * 2**20, "swap": 512 * 2**20}     # no swap on top
    assert res["cpu"]["shares"] == 1536
    assert res["cpu"]["quota"] == 200_000 and res["cpu"]["period"] == 100_000
    assert res["pids"] == {"limit": 100}
    assert cfg["linux"]["cgroupsPath"] == "/runtimed/ctr-0123456789ab"


def test_limits_defaults_and_unlimited():
    res = build_config(spec())["linux"]["resources"]
    assert res["memory"]["limit"] == 128 * 2**20
    assert res["cpu"] == {"shares": 128}             # a weight only: no hard cap by default
    assert res["pids"]["limit"] == 4096
    res = build_config(spec(memory_mb=0, cpu=0))["linux"]["resources"]
    assert "memory" not in res and "cpu" not in res
    # tiny requests still get a valid share
    assert build_config(spec(cpu=0.0001))["linux"]["resources"]["cpu"]["shares"] >= 2


def test_env_cwd_hostname_binds():
    cfg = build_config(spec(env=(("A", "1"), ("B", "x=y")), cwd="/srv", hostname="h1",
                            binds=(BindMount("/opt/agent", "/.runtimed"),
                                   BindMount("/data", "/data", readonly=False))))
    assert cfg["process"]["env"] == ["A=1", "B=x=y"]
    assert cfg["process"]["cwd"] == "/srv"
    assert cfg["hostname"] == "h1"
    binds = {m["destination"]: m for m in cfg["mounts"] if m["type"] == "bind"}
    assert binds["/.runtimed"]["source"] == "/opt/agent"
    assert "ro" in binds["/.runtimed"]["options"]
    assert "rw" in binds["/data"]["options"]
    for m in binds.values():
        assert {"nosuid", "nodev"} <= set(m["options"])
    assert cfg["root"] == {"path": "/var/lib/x/rootfs", "readonly": False}


@pytest.mark.parametrize("changes, message", [
    ({"container_id": "ctr/../x"}, "container id"),
    ({"container_id": ""}, "container id"),
    ({"container_id": "ctr x"}, "container id"),
    ({"container_id": "ctr-\u00e9t\u00e9"}, "container id"),       # isalnum() alone lets it in
    ({"rootfs": "relative/rootfs"}, "rootfs"),
    ({"args": ()}, "args"),
    ({"cwd": "srv"}, "cwd"),
    ({"cpu": -1.0}, "cpu"),
    ({"cpu": 2.0, "cpu_limit": 1.0}, "cpu limit"),
    ({"memory_mb": 8}, "memory"),
    ({"binds": (BindMount("/x", "relative"),)}, "bind"),
    ({"binds": (BindMount("/x", "/a/../etc"),)}, "bind"),
    ({"env": (("A=B", "1"),)}, "env"),
    ({"env": (("", "1"),)}, "env"),
])
def test_validate_errors(changes, message):
    bad = spec(**changes)
    with pytest.raises(SpecError, match=message):
        validate(bad)
    with pytest.raises(SpecError):
        build_config(bad)


def test_validate_accepts_a_good_spec():
    validate(spec(memory_mb=0, cpu_limit=0.0, cpu=4.0))
    validate(spec(memory_mb=16))


def test_config_is_json_serializable_and_pure():
    import json

    s = spec(netns_path="/var/run/netns/x")
    a, b = build_config(s), build_config(dataclasses.replace(s))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["ociVersion"].startswith("1.")
