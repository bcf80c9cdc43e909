"""Image builds on a node: each step runs in a runc container over its parent layers,
and the overlay upper dir it leaves becomes the step's layer (kept locally, archived
to the blob store so other nodes and later runs can pull it instead of rebuilding).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from sdk.exception import ImageBuildError, InvalidError, NotFoundError

from . import archive, bundle
from .blobs import BlobSource
from .container import Container, ContainerConfig, NodeContext
from .ids import new_id
from .layers import BASE_KEY, LayerStore

Emit = Callable[[dict], None]
FS_KINDS = ("base", "run", "files")
PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf")


@dataclass(frozen=True)
class Step:
    key: str
    kind: str
    desc: str = ""
    commands: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    blob: str = ""
    force: bool = False

    @classmethod
    def from_wire(cls, d: dict) -> "Step":
        if d.get("kind") not in FS_KINDS + ("meta",):
            raise InvalidError(f"unknown image step kind {d.get('kind')!r}")
        return cls(key=str(d["key"]), kind=d["kind"], desc=str(d.get("desc", "")),
                   commands=tuple(d.get("commands") or ()),
                   env=tuple(sorted((d.get("env") or {}).items())),
                   workdir=d.get("workdir") or "/", blob=d.get("blob") or "",
                   force=bool(d.get("force")))


def layer_keys(image: dict) -> list[str]:
    return [s["key"] for s in image.get("steps", []) if s.get("kind") in FS_KINDS]


def host_pip_setup() -> tuple[tuple[bundle.BindMount, ...], tuple[tuple[str, str], ...]]:
    """Make build steps honour the node's pip configuration (local wheel dirs, indexes)."""
    paths: set[str] = set()
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    texts = list(env.values())
    for f in PIP_CONFIG_FILES:
        if os.path.exists(f):
            paths.add(f)
            texts.append(open(f).read())
    for text in texts:
        for tok in text.replace("=", " ").split():
            p = tok[len("file://"):] if tok.startswith("file://") else tok
            if p.startswith("/") and os.path.exists(p):
                top = "/" + p.strip("/").split("/")[0]
                # bind the whole /opt/x tree a config points into, never a system dir
                paths.add(p if top in ("/etc", "/usr", "/var", "/root") else
                          "/".join(p.rstrip("/").split("/")[:3]))
    binds = tuple(bundle.BindMount(p, p) for p in sorted(paths) if os.path.exists(p))
    return binds, tuple(sorted(env.items()))


class Builder:
    def __init__(self, ctx: NodeContext, layers: LayerStore, blobs: BlobSource, work: Path):
        self.ctx, self.layers, self.blobs, self.work = ctx, layers, blobs, work
        self._locks: dict[str, asyncio.Lock] = {}
        self.pip_binds, self.pip_env = host_pip_setup()
        # set by the node: async (key, lazy info) -> True once the layer is lazily mounted
        self.lazy_policy: Callable[[str, dict], Awaitable[bool]] | None = None
        self.access_dir: Path | None = None    # where lazy mounts record opened files
        self._built_info: dict[str, dict] = {}  # layer key -> eStargz info of layers built here
        self.registry: str | None = None        # OCI registry to push builds to (None: env)

    async def ensure(self, image: dict, emit: Emit, *, build: bool = True) -> list[dict]:
        """Make every layer of `image` local: cached, pulled, or built. Returns a step report."""
        steps = [Step.from_wire(s) for s in image.get("steps", [])]
        if not steps or steps[0].kind != "base" or steps[0].key != BASE_KEY:
            raise InvalidError("an image must start from the debian_slim() base")
        archives = dict(image.get("archives") or {})
        lazy_layers = dict(image.get("lazy_layers") or {})
        report, below, forcing = [], [], False
        for i, step in enumerate(steps):
            if step.kind == "meta":
                report.append({"index": i, "desc": step.desc, "status": "meta", "key": step.key})
                continue
            forcing = forcing or step.force
            async with self._locks.setdefault(step.key, asyncio.Lock()):
                status = await self._ensure_step(i, step, below, emit, build, forcing,
                                                 archives.get(step.key, ""),
                                                 lazy_layers.get(step.key))
            self.layers.hit(step.key)
            below.append(self.layers.fs(step.key))
            report.append({"index": i, "desc": step.desc, "status": status, "key": step.key})
        if build and image.get("id"):
            await self._push(image, lazy_layers, emit)
        return report

    async def _push(self, image: dict, known: dict[str, dict], emit: Emit) -> None:
        """Push the image to the configured OCI registry (image_push.py), if any. A failed
        push is reported in the build stream; the build itself stands."""
        from . import image_push
        target = image_push.registry_target(self.registry)
        if target is None:
            return
        infos = {**known, **self._built_info}
        plan = image_push.plan_push(image, infos)
        if plan.missing:
            emit({"type": "log", "text": f"[image] not pushed: layers without an eStargz: "
                                          f"{[k[:16] for k in plan.missing]}\n"})
            return
        loop = asyncio.get_running_loop()
        try:
            blobs = []
            for key in plan.layer_keys:
                if key == BASE_KEY:
                    blobs.append(await loop.run_in_executor(
                        None, image_push.base_layer, self.layers.base_rootfs, self.work))
                    continue
                info = infos[key]
                path = await self.blobs.fetch(info["estargz_digest"].split(":")[-1])
                blobs.append(await loop.run_in_executor(None, image_push.layer_blob, path,
                                                        info))
            pushed = await loop.run_in_executor(None, image_push.push_image, *target, plan,
                                                blobs)
        except Exception as e:  # noqa: BLE001 - the build stands; say why it is not pushed
            emit({"type": "push", "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            emit({"type": "log", "text": f"[image] push to {target[0]} failed: {e}\n"})
            return
        emit({"type": "push", "ok": True, **pushed})
        emit({"type": "log", "text": f"[image] pushed {pushed['ref']} "
                                      f"({pushed['manifest_digest'][:19]})\n"})

    async def _ensure_step(self, i: int, step: Step, below: list[Path], emit: Emit,
                           build: bool, forcing: bool, known_archive: str,
                           lazy: dict | None = None) -> str:
        def say(status: str) -> None:
            emit({"type": "step", "index": i, "desc": step.desc, "status": status,
                  "key": step.key[:16]})

        if step.kind == "base":
            if not self.layers.has(BASE_KEY):
                raise NotFoundError(f"base rootfs missing at {self.layers.base_rootfs}: "
                                    "run scripts/setup.sh")
            say("cached")
            return "cached"
        if self.layers.has(step.key) and not forcing:
            say("cached")
            return "cached"
        if not build and lazy and self.lazy_policy and await self.lazy_policy(step.key, lazy):
            # Not on this node: mount it lazily now, pull it fully in the background.
            say("lazy")
            return "lazy"
        digest = step.blob if step.kind == "files" else (
            known_archive or self._archive_digest(step.key))
        if digest and not forcing:
            try:
                path = await self.blobs.fetch(digest)
                await asyncio.get_running_loop().run_in_executor(
                    None, self.layers.adopt_archive, step.key, path)
                say("pulled")
                return "pulled"
            except NotFoundError:
                if step.kind == "files":
                    raise
        if step.kind == "files":
            raise NotFoundError(f"files for step {step.desc!r} were not uploaded")
        if not build:
            raise NotFoundError(f"image layer {step.key[:16]} ({step.desc}) is not built")
        say("building")
        t0 = time.perf_counter()
        await self._build_run_step(step, below, emit)
        say("built")
        emit({"type": "log", "text": f"    done in {time.perf_counter() - t0:.1f}s\n"})
        return "built"

    def recorded_access(self, key: str) -> list[str]:
        """The access record a lazy mount of this layer left on this node, if any."""
        if self.access_dir is None:
            return []
        path = self.access_dir / f"{key[:16]}.access.json"
        try:
            from lazyfs.view import load_recorded
            return load_recorded(path)
        except (OSError, ValueError):
            return []

    def _archive_digest(self, key: str) -> str:
        """The archive this node built for `key` earlier (the dispatcher also records it)."""
        ref = self.work / "refs" / key
        if ref.exists():
            return ref.read_text().strip()
        return ""

    async def _build_run_step(self, step: Step, below: list[Path], emit: Emit) -> None:
        script = "set -e\n" + "\n".join(step.commands)
        cfg = ContainerConfig(
            layers=tuple(below), env=tuple(step.env) + self.pip_env, workdir=step.workdir,
            cpu=2.0, memory_mb=8192, network=True, args=("/bin/sh", "-c", script),
            binds=self.pip_binds, keep_upper=True)
        c = Container(new_id("bld", 6), self.ctx, cfg)
        tail: deque[str] = deque(maxlen=30)

        def sink(stream: str, text: str) -> None:
            for line in text.splitlines():
                tail.append(line)
            emit({"type": "log", "text": text})

        try:
            await c.start_raw(sink)
            code = await c.wait_exit()
        except BaseException:
            await c.destroy()
            shutil.rmtree(c.dir, ignore_errors=True)
            raise
        await c.destroy()
        if code != 0:
            shutil.rmtree(c.dir, ignore_errors=True)
            raise ImageBuildError(f"image step {step.desc!r} failed with exit code {code}",
                                  step=step.desc, exit_code=code, log_tail="\n".join(tail))
        upper = c.dir / "upper"
        loop = asyncio.get_running_loop()
        tmp_archive = self.work / f"{step.key[:16]}.tar.zst.tmp"
        # tar.zst (the node-to-node full pull) and eStargz (lazy mounts) of the same layer,
        # converted concurrently.
        tmp_estargz = self.work / f"{step.key[:16]}.estargz.tmp"
        packed_fut = loop.run_in_executor(None, archive.pack_layer, upper, tmp_archive)
        lazy_fut = loop.run_in_executor(None, _write_estargz, upper, tmp_estargz,
                                        self.recorded_access(step.key))
        packed = await packed_fut
        lazy = await lazy_fut
        await self.blobs.put_file(tmp_archive, packed.digest)
        os.unlink(tmp_archive)
        lazy_info = {}
        if lazy is not None:
            tmp_meta = self.work / f"{step.key[:16]}.meta.tmp"
            meta = await loop.run_in_executor(None, _write_meta_image, tmp_estargz,
                                              lazy.toc_digest, tmp_meta)
            await self.blobs.put_file(tmp_estargz, lazy.digest.split(":")[-1])
            lazy_info = {"estargz_digest": lazy.digest, "toc_digest": lazy.toc_digest,
                         "estargz_size": lazy.size, "diff_id": lazy.diff_id,
                         "uncompressed_size": lazy.uncompressed_size,
                         "prefetch_files": len(lazy.prioritized)}
            if meta is not None:
                await self.blobs.put_file(tmp_meta, meta[0].split(":")[-1])
                lazy_info.update(meta_digest=meta[0], meta_size=meta[1])
            tmp_meta.unlink(missing_ok=True)
            self._built_info[step.key] = lazy_info
        tmp_estargz.unlink(missing_ok=True)
        (self.work / "refs").mkdir(parents=True, exist_ok=True)
        (self.work / "refs" / step.key).write_text(packed.digest)
        self.layers.adopt_dir(step.key, upper, "built")
        shutil.rmtree(c.dir, ignore_errors=True)
        emit({"type": "layer", "key": step.key, "digest": packed.digest, "size": packed.size,
              "raw_size": packed.raw_size, **lazy_info})


def _write_meta_image(estargz: Path, toc_digest: str, out: Path) -> tuple[str, int] | None:
    """The layer's meta tree as an EROFS image (lazyfs.metaimage), published beside its
    eStargz so lazy mounts fetch it instead of building it; None (logged) if it cannot be
    one (the mounts then build or write the tree themselves)."""
    try:
        from lazyfs.metaimage import write_image_of_blob
        return write_image_of_blob(estargz, toc_digest, out)
    except Exception as e:  # noqa: BLE001 - an optimization
        import logging
        logging.getLogger(__name__).warning("no meta image for %s: %s", estargz, e)
        return None


def _write_estargz(upper: Path, out: Path, prioritized: list[str] | None = None):
    """eStargz of a layer for lazy mounts; None (logged) if this layer cannot be one.
    `prioritized`: files a lazy mount of an earlier build of this layer saw opened; they
    go first, before the prefetch landmark, so the next lazy start prefetches them."""
    try:
        import lazyfs
        return lazyfs.write_layer(upper, out, prioritized=prioritized or ())
    except Exception as e:  # noqa: BLE001 - lazy images are an optimization
        import logging
        logging.getLogger(__name__).warning("no eStargz for %s: %s", upper, e)
        return None
