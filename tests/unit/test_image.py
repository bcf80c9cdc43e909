"""sdk.image: step keys (what rebuilds when something changes), spec, file archives."""
from __future__ import annotations

import io
import tarfile

import pytest
import zstandard

from sdk import Image, InvalidError
from sdk.image import BASE_KEY


def base() -> Image:
    return Image.debian_slim()


def test_keys_are_deterministic_and_base_is_fixed():
    a = base().run_commands("echo 1").pip_install("numpy==1.26.4")
    b = base().run_commands("echo 1").pip_install("numpy==1.26.4")
    assert a.keys() == b.keys()
    assert a.keys()[0] == BASE_KEY
    assert len(set(a.keys())) == 3
    assert Image.debian_slim("3.11").keys() == [BASE_KEY]


def test_a_change_propagates_to_descendants_only():
    a = base().run_commands("echo one").run_commands("echo two").run_commands("echo three")
    b = base().run_commands("echo one").run_commands("echo TWO").run_commands("echo three")
    ka, kb = a.keys(), b.keys()
    assert ka[:2] == kb[:2]                  # base and the first step are shared
    assert ka[2] != kb[2]                    # the changed step
    assert ka[3] != kb[3]                    # and everything below it (same command)


def test_env_and_workdir_change_keys_below_only():
    plain = base().run_commands("echo a").run_commands("echo b")
    with_env = base().run_commands("echo a").env({"K": "v"}).run_commands("echo b")
    with_wd = base().run_commands("echo a").workdir("/srv").run_commands("echo b")
    assert plain.keys()[1] == with_env.keys()[1] == with_wd.keys()[1]
    assert plain.keys()[2] != with_env.keys()[3]
    assert plain.keys()[2] != with_wd.keys()[3]
    other_env = base().run_commands("echo a").env({"K": "w"}).run_commands("echo b")
    assert other_env.keys()[3] != with_env.keys()[3]
    # env and workdir are inherited by the steps below them and end up in the spec
    spec = base().env({"A": "1"}).workdir("/srv").env({"B": "2"}).run_commands("x").spec()
    assert spec["env"] == {"A": "1", "B": "2"}
    assert spec["workdir"] == "/srv"
    assert spec["steps"][-1]["env"] == {"A": "1", "B": "2"}
    assert spec["steps"][-1]["workdir"] == "/srv"
    assert [s["kind"] for s in spec["steps"]] == ["base", "meta", "meta", "meta", "run"]


def test_env_overrides_and_validation():
    img = base().env({"A": "1"}).env({"A": "2"})
    assert img.spec()["env"] == {"A": "2"}
    for bad in ({"": "x"}, {"A=B": "x"}, {"A": 1}):
        with pytest.raises(InvalidError):
            base().env(bad)


def test_add_local_file_key_depends_on_content(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("one")
    k1 = base().add_local_file(f, "/data/data.txt").keys()
    k1_again = base().add_local_file(f, "/data/data.txt").keys()
    f.write_text("two")
    k2 = base().add_local_file(f, "/data/data.txt").keys()
    assert k1 == k1_again
    assert k1[1] != k2[1]
    # the destination is part of the key too; mtime is not
    assert base().add_local_file(f, "/other/data.txt").keys()[1] != k2[1]
    f.touch()
    assert base().add_local_file(f, "/data/data.txt").keys() == k2


def _members(img: Image) -> dict[str, tarfile.TarInfo]:
    (digest, blob), = img.file_blobs()
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 26)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_add_local_file_and_dir_archives(tmp_path):
    f = tmp_path / "run.sh"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o755)
    img = base().add_local_file(f, "/usr/local/bin/")
    assert "usr/local/bin/run.sh" in _members(img)
    assert _members(img)["usr/local/bin/run.sh"].mode & 0o777 == 0o755
    assert _members(img)["usr/local/bin/run.sh"].mtime == 0

    d = tmp_path / "proj"
    (d / "pkg").mkdir(parents=True)
    (d / "pkg" / "mod.py").write_text("x = 1\n")
    (d / "top.py").write_text("y = 2\n")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "top.cpython-311.pyc").write_bytes(b"\0")
    (d / "skip.log").write_text("no")
    img = base().add_local_dir(d, "/srv/app", ignore=["skip.log"])
    names = set(_members(img))
    assert {"srv", "srv/app", "srv/app/pkg", "srv/app/pkg/mod.py", "srv/app/top.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") or "skip.log" in n for n in names)
    spec = img.spec()
    step = spec["steps"][1]
    assert step["kind"] == "files" and step["blob"] == img.file_blobs()[0][0]
    # the same tree gives the same archive bytes (so the same key)
    assert base().add_local_dir(d, "/srv/app", ignore=["skip.log"]).keys() == img.keys()


def test_add_local_errors(tmp_path):
    with pytest.raises(InvalidError):
        base().add_local_file(tmp_path / "missing", "/x")
    with pytest.raises(InvalidError):
        base().add_local_dir(tmp_path / "missing", "/x")
    f = tmp_path / "f"
    f.write_text("x")
    for bad in ("relative/path", "/a/../etc/passwd"):
        with pytest.raises(InvalidError):
            base().add_local_file(f, bad)
    with pytest.raises(InvalidError):
        base().workdir("srv")


def test_spec_steps():
    img = (base().apt_install("curl", "git").pip_install("b-pkg", "a-pkg", index_url="http://i/")
           .run_commands("echo 1", ["echo 2", "echo 3"], force_build=True))
    spec = img.spec()
    steps = spec["steps"]
    assert [s["kind"] for s in steps] == ["base", "run", "run", "run"]
    assert [s["key"] for s in steps] == img.keys()
    assert "apt-get install" in steps[1]["commands"][1] and "curl git" in steps[1]["commands"][1]
    pip = steps[2]["commands"][0]
    assert pip.startswith("python3 -m pip install")
    assert "--index-url http://i/" in pip and pip.endswith("a-pkg b-pkg")     # sorted
    assert steps[3]["commands"] == ["echo 1", "echo 2", "echo 3"]
    assert steps[3]["force"] is True and not steps[2]["force"]
    assert all(set(s) >= {"key", "kind", "desc", "commands", "env", "workdir", "blob", "force"}
               for s in steps)


def test_force_build_does_not_change_keys():
    a = base().run_commands("echo 1")
    b = base().run_commands("echo 1", force_build=True)
    assert a.keys() == b.keys()


def test_images_are_immutable():
    a = base()
    b = a.run_commands("echo 1")
    assert len(a.keys()) == 1 and len(b.keys()) == 2
    assert a.pip_install() is a                     # nothing to install: same image


def test_invalid_steps():
    with pytest.raises(InvalidError):
        base().run_commands()
    with pytest.raises(InvalidError):
        base().run_commands("  ")
    with pytest.raises(InvalidError):
        Image.debian_slim("3.12")
