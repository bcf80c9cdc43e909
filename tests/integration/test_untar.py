"""snapshot/native/untar.c, the in-process tmpfs extractor CRIU runs during restores,
against GNU tar on archives made the way CRIU dumps a tmpfs (real tar, real mknod)."""
import os
import stat
import subprocess

import pytest

from runtimed import criu_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")

# CRIU 4.1 (criu/mount.c): how it dumps and restores a tmpfs
DUMP = ["tar", "--create", "--gzip", "--no-unquote", "--no-wildcards", "--one-file-system",
        "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner"]
RESTORE = ["--extract", "--gzip", "--no-unquote", "--no-wildcards"]


@pytest.fixture(scope="module")
def untar(tmp_path_factory):
    path = criu_env.build_untar(tmp_path_factory.mktemp("bin"))
    assert path is not None, "gcc and zlib are installed by scripts/setup.sh"
    return path


def _tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pts").mkdir(mode=0o755)
    (src / "shm").mkdir()
    os.chmod(src / "shm", 0o1777)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(src / "fifo", 0o640)
    os.symlink("/proc/self/fd", src / "fd")
    os.symlink("pts/ptmx", src / "ptmx")
    (src / "file").write_bytes(os.urandom(70000))
    os.chmod(src / "file", 0o4750)
    os.chown(src / "file", 1234, 5678)
    os.link(src / "file", src / "hardlink")
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 90)).write_text("a long path")          # > 100 chars: GNU long name
    os.symlink("x" * 150, deep / "longlink")                # > 100 chars: GNU long link
    os.utime(src / "file", (1_600_000_000, 1_600_000_000))
    os.utime(deep, (1_500_000_000, 1_500_000_000))
    return src


def _describe(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_rdev, st.st_nlink,
                        os.readlink(p) if stat.S_ISLNK(st.st_mode) else None,
                        open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None,
                        int(st.st_mtime) if not stat.S_ISLNK(st.st_mode) else None)
    return out


def _extract(cmd, archive, dest):
    dest.mkdir()
    with open(archive, "rb") as f:
        r = subprocess.run([*cmd, *RESTORE, "--directory", str(dest)], stdin=f,
                           capture_output=True, env={**os.environ, "RUNTIMED_UNTAR_DEBUG": "1"})
    assert r.returncode == 0, r.stderr
    return r.stderr.decode()


def test_same_tree_as_gnu_tar(tmp_path, untar):
    src = _tree(tmp_path)
    archive = tmp_path / "tmpfs.tar.gz"
    with open(archive, "wb") as f:
        subprocess.run([*DUMP, "--directory", str(src), "."], stdout=f, check=True)
    _extract(["tar"], archive, tmp_path / "gnu")
    err = _extract([str(untar)], archive, tmp_path / "fast")
    assert "falling back" not in err            # the fast path did it all
    assert _describe(tmp_path / "fast") == _describe(tmp_path / "gnu")


def test_unknown_entries_and_unsafe_paths_fall_back_to_gnu_tar(tmp_path, untar):
    src = tmp_path / "src"
    src.mkdir()
    (src / "sparse").write_bytes(b"")
    with open(src / "sparse", "r+b") as f:             # a hole: --sparse writes a GNU 'S' entry
        f.seek(8 << 20)
        f.write(b"end")
    archive = tmp_path / "a.tar.gz"
    with open(archive, "wb") as f:
        subprocess.run([*DUMP, "--directory", str(src), "."], stdout=f, check=True)
    err = _extract([str(untar)], archive, tmp_path / "fast")
    assert "falling back" in err
    assert (tmp_path / "fast" / "sparse").read_bytes()[-3:] == b"end"
    evil = tmp_path / "evil.tar.gz"                    # ../escape: refused, GNU tar decides
    (tmp_path / "x").write_text("x")
    with open(evil, "wb") as f:
        subprocess.run(["tar", "--create", "--gzip", "--absolute-names", "--directory",
                        str(tmp_path / "src"), "../x"], stdout=f, check=True)
    dest = tmp_path / "evil-out"
    dest.mkdir()
    with open(evil, "rb") as f:
        r = subprocess.run([str(untar), *RESTORE, "--directory", str(dest)], stdin=f,
                           capture_output=True, env={**os.environ, "RUNTIMED_UNTAR_DEBUG": "1"})
    assert b"unsafe path" in r.stderr and r.returncode != 0   # GNU tar refuses it too
    assert (tmp_path / "x").read_text() == "x" and os.listdir(dest) == []

