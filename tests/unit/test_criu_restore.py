"""The CRIU options a direct restore derives from a runc bundle (pure: no CRIU run)."""
import json

import pytest

from runtimed import bundle, criu_restore


def _config(tmp_path, netns="/run/netns/rtd-x"):
    src = tmp_path / "agent"
    src.mkdir()
    spec = bundle.ContainerSpec(
        container_id="ctr-abc", rootfs=str(tmp_path / "rootfs"), args=("python3",),
        netns_path=netns, memory_mb=512,
        binds=(bundle.BindMount(str(src), "/.runtimed"),
               bundle.BindMount("/etc/resolv.conf", "/etc/resolv.conf")),
        mask_dir_source=str(tmp_path))
    return bundle.build_config(spec)


def _images(tmp_path, descriptors=("pipe:[11]", "pipe:[12]", "pipe:[13]")):
    d = tmp_path / "img"
    d.mkdir()
    (d / "descriptors.json").write_text(json.dumps(list(descriptors)))
    return d


def test_plan_maps_binds_devices_netns_and_stdio(tmp_path):
    cfg = _config(tmp_path)
    p = criu_restore.plan(cfg, _images(tmp_path), tmp_path / "w", tmp_path / "pid")
    ext = dict(p.ext_mounts)
    assert ext["/.runtimed"] == str(tmp_path / "agent")
    assert ext["/etc/resolv.conf"] == "/etc/resolv.conf"
    for dev in criu_restore.DEFAULT_DEVICES:
        assert ext[dev] == dev
    assert p.netns_path == "/run/netns/rtd-x"
    assert p.cgroup_path == "/runtimed/ctr-abc"
    assert p.resources["memory"]["limit"] == 512 * 2**20
    args = criu_restore.argv("criu", p, netns_fd=7)
    joined = " ".join(args)
    assert "--external mnt[/.runtimed]:" + str(tmp_path / "agent") in joined
    assert "--inherit-fd fd[7]:extRootNetNS" in joined and "--empty-ns net" in joined
    for i, name in enumerate(("pipe:[11]", "pipe:[12]", "pipe:[13]")):
        assert f"--inherit-fd fd[{i}]:{name}" in joined
    assert "--restore-sibling" in args and "--manage-cgroups=ignore" in args
    assert "--lazy-pages" not in args


def test_plan_lazy_and_no_netns(tmp_path):
    cfg = _config(tmp_path, netns=None)
    p = criu_restore.plan(cfg, _images(tmp_path, ("/dev/null", "pipe:[5]", "pipe:[6]")),
                          tmp_path / "w", tmp_path / "pid", lazy=True)
    args = criu_restore.argv("criu", p, netns_fd=None)
    assert "--lazy-pages" in args
    assert not any("extRootNetNS" in a for a in args)
    assert "fd[0]:/dev/null" not in " ".join(args)      # only pipes are re-plumbed


def test_plan_without_descriptors_is_a_clear_error(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(criu_restore.DirectRestoreError, match="descriptors.json"):
        criu_restore.plan(_config(tmp_path), tmp_path / "img", tmp_path / "w", tmp_path / "pid")


def test_mountpoints_cannot_escape_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to("/tmp")           # a hostile image: /etc -> host /tmp
    p = criu_restore.RestorePlan(
        image_dir=tmp_path, work_dir=tmp_path, rootfs=str(root), pidfile=tmp_path / "pid",
        cgroup_path="/runtimed/x", resources={}, netns_path=None, ext_mounts=(),
        stdio=(), mountpoints=(("/etc/evil", False),))
    with pytest.raises(criu_restore.DirectRestoreError, match="escapes"):
        criu_restore._make_mountpoints(p)


def test_device_rule_format():
    from runtimed.cgroups import _dev_rule
    assert _dev_rule({"allow": False, "access": "rwm"}) == "a *:* rwm"
    assert _dev_rule({"type": "c", "major": 136, "minor": -1, "access": "rwm"}) == "c 136:* rwm"
    assert _dev_rule({"type": "c", "major": 1, "minor": 3}) == "c 1:3 rwm"
