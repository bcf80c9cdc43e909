"""One function container: rootfs + netns + runc + the agent conversation.

State machine (invalid transitions raise):

    creating ──► starting ──► idle ◄──► busy
        │            │          │         │
        └────────────┴──────────┴─────────┴──► dead

The agent's channel is stdin/stdout pipes; a reader task turns frames into
replies (one outstanding request at a time) and log lines for the current call.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import shutil
import signal as _signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from sdk.exception import ContainerCrashError, ExecutionError, FunctionTimeoutError, OOMError

from . import archive, bundle, cgroups, criu_env, criu_restore, protocol, rootfs
from .netns import NetnsHandle, NetworkManager

if TYPE_CHECKING:
    from cuda_restore.assign import GpuAssignment

    from .lazy_daemons import SpareLazyDaemons
from .runc import Runc

log = logging.getLogger(__name__)

LogSink = Callable[[str, str], None]          # (stream, text)
AGENT_ARGS = ("python3", "-u", "-X", "frozen_modules=on", "/.runtimed/agent.py")


@dataclass(frozen=True)
class RestoreSource:
    """A materialized snapshot: CRIU image dir + the container's upper dir archive."""

    image_dir: Path
    upper_archive: Path | None
    lazy: bool = False        # pages served on first touch by a `criu lazy-pages` daemon
    # Lazy only: given the daemon's page-fault log once it exits (working-set recording).
    on_lazy_log: "Callable[[bytes], None] | None" = None


class State(enum.Enum):
    CREATING = "creating"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


_ALLOWED = {
    State.CREATING: {State.STARTING, State.DEAD},
    State.STARTING: {State.IDLE, State.DEAD},
    State.IDLE: {State.BUSY, State.DEAD},
    State.BUSY: {State.IDLE, State.DEAD},
    State.DEAD: set(),
}


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class ContainerConfig:
    """What the node decided for one container (pure data)."""

    layers: tuple[Path, ...]          # bottom-up, base rootfs first
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    cpu: float = 0.125
    cpu_limit: float = 0.0
    memory_mb: int = 128
    network: bool = True
    args: tuple[str, ...] = AGENT_ARGS
    binds: tuple[bundle.BindMount, ...] = ()
    keep_upper: bool = False          # image builds keep the upper dir as the new layer
    gpu: "GpuAssignment | None" = None  # GPUs bound late: device nodes injected before user code


@dataclass
class NodeContext:
    """Shared node resources a container needs."""

    runc: Runc
    network: NetworkManager
    containers_dir: Path
    agent_dir: Path                   # bind-mounted read-only at /.runtimed
    resolv_conf: str = "/etc/resolv.conf"
    criu_config: str | None = None    # passed to CRIU by runc via the org.criu.config annotation
    empty_dir: str | None = None      # read-only source for masking /proc and /sys dirs
    restore_engine: str = "auto"      # criu_restore.ENGINES: "runc" keeps `runc restore`
    lazy_spares: "SpareLazyDaemons | None" = None   # lazy-pages daemons started ahead


@dataclass
class Spans:
    """Named phase timings in ms, in order; they feed call metadata and the benchmark."""

    items: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.items[name] = round((now - t0) * 1000, 3)
        return now


class Container:
    def __init__(self, cid: str, ctx: NodeContext, cfg: ContainerConfig, *, function_key: str = ""):
        self.id, self.ctx, self.cfg, self.function_key = cid, ctx, cfg, function_key
        self.dir = ctx.containers_dir / cid
        self.state = State.CREATING
        self.spans = Spans()
        self.created_at = time.time()
        self.last_used = time.monotonic()
        self.ready_at = 0.0                  # perf_counter when it became ready to serve
        self.calls_served = 0
        self.tier = "cold"
        self.snapshot_note = ""
        self.restore_mode: tuple[str, str, float] | None = None   # (snapshot, mode, t0)
        self.pid: int | None = None
        self.netns: NetnsHandle | None = None
        self._stdin: asyncio.StreamWriter | None = None
        self._replies: asyncio.Queue[protocol.Frame | None] = asyncio.Queue()
        self._sink: LogSink | None = None
        self._tail: deque[str] = deque(maxlen=50)
        self._tasks: list[asyncio.Task] = []
        self._death: ExecutionError | None = None
        self._mounted = False
        self._raw = False
        self._destroyed = False
        self._lazy_daemon: asyncio.subprocess.Process | None = None
        self._lazy_spare_dir: Path | None = None      # the spare daemon's dir, if one served
        self._lazy_watch: asyncio.Task | None = None
        self._direct = False                 # restored by CRIU directly: runc does not know it
        self._criu_exit: asyncio.Task | None = None   # that CRIU, maybe still finishing
        self._config: dict = {}              # the bundle's config.json, as written
        self.on_destroy: list[Callable[[], Awaitable[None]]] = []   # e.g. release memory

    # -- state ---------------------------------------------------------------------------
    def _to(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(f"container {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def cgroup_path(self) -> str:
        return f"/runtimed/{self.id}"

    @property
    def direct_restored(self) -> bool:
        return self._direct

    @property
    def alive(self) -> bool:
        return self.state not in (State.DEAD,)

    # -- start ---------------------------------------------------------------------------
    async def start(self, restore: "RestoreSource | None" = None) -> None:
        """Create netns and rootfs, write the bundle, then start runc (or restore a CRIU
        snapshot into the fresh sandbox) with pipes as stdio."""
        t = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        lazy_start = None
        spares = self.ctx.lazy_spares
        if restore is not None and restore.lazy:
            spare = (spares.take(restore.image_dir)
                     if spares is not None and restore.on_lazy_log is None else None)
            if spare is not None:                    # started ahead: nothing to wait for
                spares.link(spare, self.dir / "criu-work")
                self._lazy_daemon, self._lazy_spare_dir = spare.proc, spare.work
            else:                                    # its start-up overlaps the sandbox's
                lazy_start = asyncio.create_task(start_lazy_pages(
                    self.ctx.runc.criu or "criu", restore.image_dir, self.dir / "criu-work",
                    verbose=restore.on_lazy_log is not None))
        try:
            self.netns = (self.ctx.network.try_pooled(network=self.cfg.network)
                          or await loop.run_in_executor(
                              None, lambda: self.ctx.network.acquire(network=self.cfg.network)))
            t = self.spans.add("netns", t)
            plan = rootfs.plan_overlay(list(self.cfg.layers), self.dir)
            if restore is not None and restore.upper_archive is not None:
                # Files the imports and snap hooks wrote come back with the snapshot.
                await loop.run_in_executor(None, archive.unpack_layer, restore.upper_archive,
                                           Path(plan.upper))
                t = self.spans.add("upper_restore", t)
            rootfs.mount_overlay(plan)
            self._mounted = True
            spec = self._spec(plan.merged)
            self._config = bundle.build_config(spec)
            (self.dir / "config.json").write_text(json.dumps(self._config))
            t = self.spans.add("rootfs", t)
            if lazy_start is not None:
                self._lazy_daemon = await lazy_start
                lazy_start = None
                t = self.spans.add("lazy_daemon", t)     # the part the setup did not hide
            await self._spawn(restore)
            self.spans.add(("criu_restore" if self._direct else "runc_restore") if restore
                           else "runc_run", t)
            if restore is not None and restore.lazy and spares is not None:
                spares.refill(restore.image_dir)     # for the next lazy restore of it
            self._to(State.STARTING)
        except BaseException:
            if lazy_start is not None:
                lazy_start.cancel()                  # (it kills its daemon when cancelled)
            await self.destroy()
            raise

    def _spec(self, merged: str) -> bundle.ContainerSpec:
        binds = [bundle.BindMount(str(self.ctx.agent_dir), "/.runtimed")]
        if self.cfg.network and os.path.exists(self.ctx.resolv_conf):
            binds.append(bundle.BindMount(os.path.realpath(self.ctx.resolv_conf),
                                          "/etc/resolv.conf"))
        binds.extend(self.cfg.binds)
        env = dict(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   HOME="/root", LANG="C.UTF-8", PYTHONDONTWRITEBYTECODE="1")
        env.update(dict(self.cfg.env))
        return bundle.ContainerSpec(
            container_id=self.id, rootfs=merged, args=self.cfg.args, env=tuple(env.items()),
            cwd=self.cfg.workdir or "/", hostname=self.id[:63], cpu=self.cfg.cpu, cpu_limit=self.cfg.cpu_limit,
            memory_mb=self.cfg.memory_mb, netns_path=self.netns.path if self.netns else None,
            binds=tuple(binds), mask_dir_source=self.ctx.empty_dir,
            device_rules=tuple(self.cfg.gpu.cgroup_rules()) if self.cfg.gpu else (),
            annotations=(("org.criu.config", self.ctx.criu_config),) if self.ctx.criu_config else ())

    async def _spawn(self, restore: "RestoreSource | None" = None) -> None:
        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            if restore is None:
                await self.ctx.runc.run_detached(self.id, self.dir, in_r, out_w, err_w)
            else:
                work = self.dir / "criu-work"
                if criu_restore.available(self.ctx.restore_engine):
                    # Bypass `runc restore` (see criu_restore.py): the container is then
                    # managed through its cgroup, not runc.
                    self._direct = True
                    plan = criu_restore.plan(self._config, restore.image_dir, work,
                                             self.dir / "pid", lazy=restore.lazy)
                    handle = await criu_restore.restore(self.ctx.runc.criu or "criu", plan,
                                                        in_r, out_w, err_w,
                                                        env=self.ctx.runc.restore_env)
                    self._criu_exit = handle.exited
                    handle.exited.add_done_callback(self._criu_exited)
                else:
                    await self.ctx.runc.restore_detached(self.id, self.dir, restore.image_dir,
                                                         work, in_r, out_w, err_w,
                                                         lazy=restore.lazy)
                # The lazy-pages daemon (started by start(); destroy() stops it on failure)
                # exits once every page is in: its log holds the faults, for the recorder.
                if self._lazy_daemon is not None and restore.on_lazy_log is not None:
                    self._lazy_watch = asyncio.create_task(self._harvest_lazy_log(
                        self._lazy_daemon, work / "lazy-pages.log", restore.on_lazy_log))
        except BaseException:
            for fd in (in_w, out_r, err_r):       # our ends: nobody will read or write them
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        try:
            self.pid = int((self.dir / "pid").read_text())
        except (OSError, ValueError):
            self.pid = None
        w_transport, w_proto = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(in_w, "wb", buffering=0))
        self._stdin = asyncio.StreamWriter(w_transport, w_proto, None, loop)
        out_reader = asyncio.StreamReader(limit=2**20, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(out_reader),
                                     os.fdopen(out_r, "rb", buffering=0))
        err_reader = asyncio.StreamReader(limit=2**20, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(err_reader),
                                     os.fdopen(err_r, "rb", buffering=0))
        if self._raw:
            self._tasks = [asyncio.create_task(self._read_stderr(out_reader, "stdout")),
                           asyncio.create_task(self._read_stderr(err_reader))]
            self._stdin.close()     # build steps get EOF on stdin, like `docker build`
            self._stdin = None
        else:
            self._tasks = [asyncio.create_task(self._read_frames(out_reader)),
                           asyncio.create_task(self._read_stderr(err_reader))]

    async def _harvest_lazy_log(self, daemon: asyncio.subprocess.Process, log_path: Path,
                                cb: Callable[[bytes], None]) -> None:
        """The daemon exits once every page is in (or the container died): hand its log on."""
        await daemon.wait()
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, log_path.read_bytes)
            cb(data)
        except Exception as e:             # recording is an optimization, never a failure
            log.warning("working-set recording of %s failed: %s", self.id, e)

    # -- channel -------------------------------------------------------------------------
    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await protocol.read_frame(reader)
                if frame is None:
                    break
                if frame.op == "log":
                    self._emit(frame.get("stream", "stdout"), frame.payload.decode("utf-8", "replace"))
                else:
                    self._replies.put_nowait(frame)
        except (protocol.ProtocolError, ConnectionError) as e:
            log.warning("container %s: bad frame stream: %s", self.id, e)
        finally:
            self._replies.put_nowait(None)

    async def _read_stderr(self, reader: asyncio.StreamReader, stream: str = "stderr") -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            self._emit(stream, chunk.decode("utf-8", "replace"))

    def _emit(self, stream: str, text: str) -> None:
        for line in text.splitlines()[-5:]:
            self._tail.append(line)
        if self._sink is not None:
            try:
                self._sink(stream, text)
            except Exception:  # a broken sink must not kill the channel
                log.exception("log sink failed")

    async def _send(self, op: str, payload: bytes = b"", **header) -> None:
        assert self._stdin is not None
        try:
            self._stdin.write(protocol.encode(op, payload, **header))
            await self._stdin.drain()
        except (ConnectionError, BrokenPipeError):
            pass  # the reader sees EOF and reports the death

    async def _reply(self, timeout: float | None) -> protocol.Frame:
        try:
            frame = await asyncio.wait_for(self._replies.get(), timeout)
        except asyncio.TimeoutError:
            raise
        if frame is None:
            raise await self._died()
        return frame

    async def _died(self) -> ExecutionError:
        """Work out why the agent went away (OOM kill, crash) and mark the container dead."""
        if self._death is not None:
            return self._death
        status = await asyncio.get_running_loop().run_in_executor(None, self._reap)
        mem = cgroups.memory_report(self.cgroup_path)
        tail = "\n".join(self._tail)
        if mem.oom_kills or status == -_signal.SIGKILL and mem.peak_bytes and mem.limit_bytes \
                and mem.peak_bytes >= mem.limit_bytes * 0.95:
            peak = f"{mem.peak_bytes / 2**20:.0f} MiB" if mem.peak_bytes else "unknown"
            self._death = OOMError(
                f"the container ran out of memory: limit {self.cfg.memory_mb} MiB, peak {peak}. "
                f"Raise memory= on the function.")
        else:
            how = f"killed by signal {-status}" if status and status < 0 else f"exit status {status}"
            self._death = ContainerCrashError(
                f"the container exited without a result ({how}).\n{tail}".rstrip())
        if self.state is not State.DEAD:
            self.state = State.DEAD
        return self._death

    def _reap(self) -> int | None:
        """Exit status of the container's init (we are its subreaper); None if unknown."""
        if not self.pid:
            return None
        for _ in range(50):
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return os.waitstatus_to_exitcode(st)
            time.sleep(0.01)
        return None

    # -- raw mode (image build steps) -----------------------------------------------------
    async def start_raw(self, sink: LogSink) -> None:
        """Start a plain command (no agent); its stdout/stderr go to `sink`."""
        self._raw, self._sink = True, sink
        await self.start()

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait for a raw-mode container to exit; its exit code (negative: signal)."""
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)
        status = await asyncio.get_running_loop().run_in_executor(None, self._reap)
        self.state = State.DEAD
        return status

    # -- agent conversation ----------------------------------------------------------------
    async def init(self, function_blob: bytes, *, timeout: float = 300.0,
                   sink: LogSink | None = None, snapshot: bool = False, fork: bool = False,
                   on_snap_point: Callable[["Container"], Awaitable[None]] | None = None) -> dict:
        """Load the function in the agent (imports, enter hooks). With `snapshot`, the agent
        stops at the snapshot point and `on_snap_point(self)` runs (the checkpoint) before
        it resumes. Returns the ready header."""
        t = time.perf_counter()
        self._sink = sink
        try:
            if not snapshot:
                await self.attach_gpus()
            await self._send("init", function_blob, workdir=self.cfg.workdir, snapshot=snapshot,
                             fork=fork, env=self._identity() if not snapshot else {})
            frame = await self._reply(timeout)
            if frame.op == "snap_point":
                t = self.spans.add("agent_snap_point", t)
                self._import_header(frame)
                if on_snap_point is not None:
                    await on_snap_point(self)
                    t = time.perf_counter()
                await self.attach_gpus()
                await self._send("resume", seed=_seed(), env=self._identity())
                frame = await self._reply(timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise FunctionTimeoutError(f"the container did not finish importing in {timeout:.0f} s")
        finally:
            self._sink = None
        self.spans.add("agent_ready", t)
        if frame.op == "init_error":
            self.state = State.DEAD
            raise RemoteInitError(frame)
        if "import_ms" in frame.header:
            self._import_header(frame)
        self._to(State.IDLE)
        return frame.header

    def _import_header(self, frame: protocol.Frame) -> None:
        self.spans.items["imports"] = round(float(frame.get("import_ms", 0)), 3)
        if "import_cpu_ms" in frame.header:
            self.spans.items["imports_cpu"] = round(float(frame.get("import_cpu_ms", 0)), 3)
        self.spans.items["enter"] = round(float(frame.get("enter_ms", 0)), 3)

    def _identity(self) -> dict:
        env = {"RUNTIMED_CONTAINER_ID": self.id}
        if self.cfg.gpu is not None:
            env.update(self.cfg.gpu.visible_env())
        return env

    async def attach_gpus(self) -> None:
        """Create the assigned /dev/nvidia* nodes in the running (or restored) container,
        and drop any a snapshot brought back: GPUs are bound as late as possible."""
        if self.cfg.gpu is None or not self.pid:
            return
        from cuda_restore.assign import inject_device_nodes
        t = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(
            None, inject_device_nodes, f"/proc/{self.pid}/root", self.cfg.gpu.devices)
        self.spans.add("gpu_attach", t)

    async def resume(self, *, timeout: float = 60.0) -> dict:
        """A restored agent waits at the snapshot point: reseed it and run `@enter()` hooks."""
        t = time.perf_counter()
        await self.attach_gpus()
        await self._send("resume", seed=_seed(), env=self._identity())
        try:
            frame = await self._reply_unless_criu_fails(timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise FunctionTimeoutError(f"the restored container did not resume in {timeout:.0f} s")
        self.spans.add("resume", t)
        if frame.op == "init_error":
            self.state = State.DEAD
            raise RemoteInitError(frame)
        self._to(State.IDLE)
        return frame.header

    def _criu_exited(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.state is not State.DEAD:
            log.warning("%s: CRIU failed after handing over: %s", self.id, task.exception())

    async def _reply_unless_criu_fails(self, timeout: float) -> protocol.Frame:
        """The agent's reply to resume, or CRIU's failure if it fails first (a direct
        restore hands over before CRIU has exited: criu_restore.restore)."""
        criu = self._criu_exit
        if criu is None or criu.done():
            if criu is not None:
                criu.result()
            return await self._reply(timeout)
        reply = asyncio.create_task(self._reply(timeout))
        await asyncio.wait({reply, criu}, return_when=asyncio.FIRST_COMPLETED)
        if criu.done() and criu.exception() is not None:
            reply.cancel()
            raise criu.exception()
        return await reply

    async def call(self, call_id: str, args_blob: bytes, *, method: str | None = None,
                   timeout: float | None = None, sink: LogSink | None = None,
                   fork: bool = False) -> protocol.Frame:
        """Run one call; returns the agent's `result` frame. Raises ExecutionError subclasses."""
        self._to(State.BUSY)
        self._sink = sink
        try:
            await self._send("call", args_blob, call_id=call_id, method=method, fork=fork)
            try:
                frame = await self._reply(timeout)
            except asyncio.TimeoutError:
                await self.kill()
                raise FunctionTimeoutError(
                    f"the call ran past its timeout of {timeout:g} s and was stopped") from None
        finally:
            self._sink = None
        self.calls_served += 1
        self.last_used = time.monotonic()
        self._to(State.IDLE)
        return frame

    async def kill(self) -> None:
        self.state = State.DEAD
        await self._kill_all()

    async def _kill_all(self) -> None:
        if self._direct:      # shielded like the netns removal in destroy()
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                None, cgroups.v1_kill_and_remove, self.cgroup_path))
        else:
            await self.ctx.runc.kill(self.id)

    async def destroy(self) -> None:
        """Stop and remove everything the container holds; safe to call more than once."""
        self.state = State.DEAD
        if self._destroyed:
            return
        self._destroyed = True
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        await self._kill_all()
        if not self._direct:
            try:
                await self.ctx.runc.delete(self.id)
            except Exception as e:
                log.warning("runc delete %s: %s", self.id, e)
        if self.pid:
            await asyncio.get_running_loop().run_in_executor(None, self._reap)
        for task in self._tasks:
            task.cancel()
        if self._criu_exit is not None and not self._criu_exit.done():
            await asyncio.wait([self._criu_exit], timeout=10)
        if self._lazy_daemon is not None and self._lazy_daemon.returncode is None:
            self._lazy_daemon.kill()
            await self._lazy_daemon.wait()
        if self._lazy_watch is not None:
            await asyncio.wait([self._lazy_watch], timeout=5)
        if criu_env.keep_log(self.dir / "criu-work" / "restore.log", f"{self.id}.log"):
            criu_env.keep_log((self._lazy_spare_dir or self.dir / "criu-work") / "lazy-pages.log",
                              f"{self.id}.lazy.log")
        if self._lazy_spare_dir is not None:
            shutil.rmtree(self._lazy_spare_dir, ignore_errors=True)
            self._lazy_spare_dir = None
        if self._mounted:
            rootfs.teardown(self.dir, keep_upper=self.cfg.keep_upper)
            self._mounted = False
        elif not self.cfg.keep_upper:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.netns is not None:
            net, self.netns = self.netns, None
            # Shielded: a destroy cancelled here (node shutdown cancels pool tasks) must
            # still remove the namespace and its address lease, or both outlive us.
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                None, self.ctx.network.destroy, net))
        for cb in self.on_destroy:
            await cb()

    def describe(self) -> dict:
        return {"id": self.id, "function": self.function_key, "state": self.state.value,
                "tier": self.tier, "calls": self.calls_served, "pid": self.pid,
                "created_at": self.created_at, "address": self.netns.address if self.netns else None,
                "memory_mb": self.cfg.memory_mb, "cpu": self.cfg.cpu,
                "rss_bytes": cgroups.memory_rss(self.cgroup_path), "spans": self.spans.items}


LAZY_DAEMON_NICE = 10


async def start_lazy_pages(criu: str, image_dir: Path, work: Path, *, verbose: bool = False,
                           timeout: float = 5.0) -> asyncio.subprocess.Process:
    """Start the `criu lazy-pages` daemon for one restore; it serves the image's pages on
    first touch (userfaultfd) and exits once every page is transferred. `verbose` (-v4)
    logs each page fault: the working-set recorder reads them."""
    work.mkdir(parents=True, exist_ok=True)
    sock = work / "lazy-pages.socket"
    sock.unlink(missing_ok=True)          # a stale socket makes the restore fail
    proc = await asyncio.create_subprocess_exec(
        criu, "lazy-pages", "--images-dir", str(image_dir), "--work-dir", str(work),
        "-o", "lazy-pages.log", *(["-v4"] if verbose else []), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:    # its background copy of the cold pages must not starve the first call
        os.setpriority(os.PRIO_PROCESS, proc.pid, LAZY_DAEMON_NICE)
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    try:
        while not sock.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"criu lazy-pages did not start (see {work}/lazy-pages.log)")
            await asyncio.sleep(0.001)
    except BaseException:                    # failed, or the restore was abandoned
        if proc.returncode is None:
            proc.kill()
        raise
    return proc


def _seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


class RemoteInitError(Exception):
    """The function's module failed to import or an enter hook raised, inside the container."""

    def __init__(self, frame: protocol.Frame):
        super().__init__(frame.get("message", "init failed"))
        self.frame = frame
