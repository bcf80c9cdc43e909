"""Freezing a container's cgroup before a dump (runtimed/cgroups.py), on the real kernel."""
import os
import shutil
import subprocess
import uuid

import pytest

from runtimed import cgroups, criu_env

pytestmark = pytest.mark.integration


@pytest.fixture
def group():
    if not cgroups.v1_hierarchies():
        pytest.skip("v1 cgroup hierarchies only (this CI host has them)")
    path = f"/runtimed/test-freeze-{uuid.uuid4().hex[:8]}"
    cgroups.v1_create(path, {})
    p = subprocess.Popen(["sleep", "60"])
    for d in cgroups.v1_dirs(path):
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(p.pid))
    yield path, p
    assert cgroups.v1_kill_and_remove(path)
    p.wait(timeout=5)


def test_freeze_waits_until_frozen_and_thaw_resumes(group):
    path, p = group
    assert cgroups.freeze(path)
    state = open(f"/sys/fs/cgroup/freezer{path}/freezer.state").read().strip()
    assert state == "FROZEN"
    cgroups.thaw(path)
    assert open(f"/sys/fs/cgroup/freezer{path}/freezer.state").read().strip() == "THAWED"
    assert p.poll() is None


def test_a_frozen_group_can_still_be_killed_and_removed(group):
    path, p = group
    assert cgroups.freeze(path)
    # the fixture's teardown kills and removes it: it must thaw first, or SIGKILL waits


def test_freeze_of_a_missing_group_is_false_not_an_error():
    assert cgroups.freeze("/runtimed/no-such-group-" + uuid.uuid4().hex, timeout=0.05) is False
    cgroups.thaw("/runtimed/no-such-group")      # nothing to thaw: no error


def test_dump_env_puts_noop_lock_tools_first_but_keeps_tar(tmp_path):
    env = criu_env.dump_env(tmp_path)
    first = env["PATH"].split(":")[0]
    assert os.path.realpath(os.path.join(first, "iptables-restore")) == os.path.realpath(
        shutil.which("true"))
    assert not os.path.exists(os.path.join(first, "tar"))
    rc = subprocess.run(["iptables-restore", "-w", "--noflush"], input=b"*filter\nCOMMIT\n",
                        env=env).returncode
    assert rc == 0
