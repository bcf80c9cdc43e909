"""Spare lazy-pages daemons (runtimed/lazy_daemons.py) with a stand-in daemon: a process
that listens on the socket as `criu lazy-pages` would."""
import asyncio
import os
import socket
import sys

import pytest

from runtimed.lazy_daemons import SOCKET, SpareLazyDaemons

LISTEN = ("import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
          "s.listen(1); c,_=s.accept(); c.sendall(b'hi'); time.sleep(30)")


async def _fake_start(image_dir, work):
    work.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", LISTEN, str(work / SOCKET))
    while not (work / SOCKET).exists():
        await asyncio.sleep(0.005)
    return proc


def _run(coro):
    return asyncio.run(coro)


def test_spare_is_started_later_taken_once_and_reached_through_the_link(tmp_path):
    async def main():
        img = tmp_path / "snap"
        img.mkdir()
        spares = SpareLazyDaemons(tmp_path / "lzd", _fake_start, refill_delay=0.05)
        assert spares.take(img) is None
        spares.refill(img)
        spares.refill(img)                        # one spare per snapshot, not two
        assert len(spares) == 0                   # not before the delay
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(spares):
                break
        assert len(spares) == 1 and spares.snapshots() == ["snap"]
        spare = spares.take(img)
        assert spare is not None and spares.take(img) is None
        assert spares.snapshots() == []
        work = tmp_path / "ctr" / "criu-work"
        spares.link(spare, work)
        # What `criu restore --work-dir work` does: connect to work/lazy-pages.socket.
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(work / SOCKET))
        assert s.recv(2) == b"hi"
        s.close()
        spare.proc.kill()
        await spare.proc.wait()
        await spares.close()
    _run(main())


def test_dead_or_orphaned_spares_are_not_handed_out_and_close_kills_them(tmp_path):
    async def main():
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        spares = SpareLazyDaemons(tmp_path / "lzd", _fake_start, refill_delay=0, max_spares=1)
        spares.refill(a)
        await asyncio.sleep(0)
        await asyncio.gather(*spares._pending.values())
        sa = spares._spares[str(a)]
        sa.proc.kill()
        await sa.proc.wait()
        assert spares.take(a) is None             # died: not handed out, dir cleaned
        assert not sa.work.exists()
        spares.refill(a)
        spares.refill(b)
        await asyncio.sleep(0)
        await asyncio.gather(*spares._pending.values())
        assert len(spares) == 1                   # the cap keeps the newest
        live = list(spares._spares.values())
        os.rmdir(b) if str(b) in spares._spares else os.rmdir(a)
        spares._prune()                           # snapshot removed: its spare goes
        assert len(spares) == 0
        for sp in live:
            await sp.proc.wait()                  # killed
        spares.refill(a if a.exists() else b)
        await spares.close()                      # pending refill cancelled
        assert len(spares) == 0
    _run(main())


def test_drop_stops_the_spare_of_a_removed_snapshot(tmp_path):
    async def main():
        img = tmp_path / "snap"
        img.mkdir()
        spares = SpareLazyDaemons(tmp_path / "lzd", _fake_start, refill_delay=0)
        spares.refill(img)
        await asyncio.sleep(0)
        await asyncio.gather(*spares._pending.values())
        spare = spares._spares[str(img)]
        spares.drop(img)
        assert len(spares) == 0 and not spare.work.exists()
        assert await asyncio.wait_for(spare.proc.wait(), 5) is not None
        spares.drop(img)                                   # nothing there: no error
        await spares.close()
    _run(main())
