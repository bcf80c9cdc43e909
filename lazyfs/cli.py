"""`python -m lazyfs convert|inspect|mount|unmount|push|serve`.

    convert SRC_DIR OUT [--prioritized-from RECORD.json] [--prioritize PATH ...]
            [--chunk-size N] [--skip-devices]
    inspect (BLOB | --registry URL --name NAME --digest D) [--toc-digest D] [--verify]
    mount MOUNTPOINT (--file BLOB | --registry URL --name NAME --digest D
                      | --dispatcher URL --digest D [--token-file F])
          [--toc-digest D] [--cache DIR] [--record F] [--status F] [--no-prefetch]
    unmount MOUNTPOINT
    push --registry URL --name NAME --tag TAG BLOB...      (eStargz blobs -> one image)
    serve                                                  (internal: MountSpec JSON on stdin)

Results are printed as JSON; errors as one line on stderr with exit status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import LazyFSError
from .estargz import DEFAULT_CHUNK_SIZE

TOKEN_ENV = "LAZYFS_TOKEN"
# the working set decoded by a helper process while the server builds its tree (early.py);
# LAZYFS_EARLY_PREFETCH=0: by the server itself, after the meta tree
EARLY = os.environ.get("LAZYFS_EARLY_PREFETCH", "1") != "0"
MAX_META_IMAGE = 256 << 20          # ~250 bytes per entry: a million-file layer fits


def _source_args(p: argparse.ArgumentParser, file_positional: bool) -> None:
    if file_positional:
        p.add_argument("blob", nargs="?", help="local eStargz blob")
    else:
        p.add_argument("--file", dest="blob", help="local eStargz blob")
    p.add_argument("--registry", help="registry base URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--dispatcher", help="dispatcher base URL")
    p.add_argument("--name", default="", help="repository name (registry)")
    p.add_argument("--digest", default="", help="blob digest sha256:...")
    p.add_argument("--token-file", help=f"bearer token file (or ${TOKEN_ENV})")
    p.add_argument("--toc-digest", help="expected TOC digest (layer annotation)")


def _source_spec(a: argparse.Namespace):
    from .mount import SourceSpec
    token = ""
    if a.token_file:
        token = Path(a.token_file).read_text().strip()
    token = token or os.environ.get(TOKEN_ENV, "")
    if a.registry:
        return SourceSpec("registry", a.registry, digest=a.digest, name=a.name, token=token)
    if a.dispatcher:
        return SourceSpec("dispatcher", a.dispatcher, digest=a.digest, token=token)
    if a.blob:
        return SourceSpec("file", os.path.abspath(a.blob))
    raise SystemExit("give a blob file, --registry or --dispatcher")


def cmd_convert(a: argparse.Namespace) -> dict:
    from .estargz import write_layer
    from .view import load_recorded, load_recorded_ranges
    prio = list(a.prioritize or [])
    ranges = {}
    if a.prioritized_from:
        prio = load_recorded(a.prioritized_from) + prio
        ranges = load_recorded_ranges(a.prioritized_from)
    b = write_layer(Path(a.src), Path(a.out), prioritized=prio, read_ranges=ranges,
                    chunk_size=a.chunk_size, skip_devices=a.skip_devices)
    return {"path": str(b.path), "digest": b.digest, "size": b.size, "diff_id": b.diff_id,
            "toc_digest": b.toc_digest, "uncompressed_size": b.uncompressed_size,
            "entries": b.entries, "prioritized": list(b.prioritized), "missing": list(b.missing),
            "skipped": list(b.skipped), "partial": list(b.partial)}


def cmd_inspect(a: argparse.Namespace) -> dict:
    from .mount import open_source
    from .reader import open_estargz
    src = open_source(_source_spec(a))
    try:
        blob = open_estargz(src, a.toc_digest)
        out = {"source": src.describe(), "size": blob.size, "toc_offset": blob.toc_offset,
               "toc_digest": blob.toc_digest, "toc_verified": bool(a.toc_digest),
               "entries": len(blob.toc.entries), "inodes": len(blob.tree.nodes),
               "chunks": len(blob.tree.chunks_in_order), "prefetch_end": blob.tree.prefetch_end,
               "prioritized": list(blob.tree.prioritized)}
        if a.verify:
            out["verified_bytes"] = blob.verify_all()
        if a.list:
            out["files"] = sorted(blob.tree.paths)
        out["fetched"] = src.stats()
        return out
    finally:
        src.close()


def cmd_mount(a: argparse.Namespace) -> dict:
    from .mount import DEFAULT_CACHE, MountSpec, mount
    spec = MountSpec(source=_source_spec(a), mountpoint=os.path.abspath(a.mountpoint),
                     toc_digest=a.toc_digest, cache_dir=a.cache or DEFAULT_CACHE,
                     record_path=a.record, status_path=a.status, prefetch=not a.no_prefetch)
    h = mount(spec, log_path=a.log)
    return {"mountpoint": h.mountpoint, "pid": h.proc.pid, "log": str(h.log_path)}


def cmd_unmount(a: argparse.Namespace) -> dict:
    from .mount import unmount
    unmount(a.mountpoint)
    return {"unmounted": os.path.abspath(a.mountpoint)}


def cmd_push(a: argparse.Namespace) -> dict:
    from .reader import blob_info
    from .registry import RegistryClient
    layers = [blob_info(Path(p)) for p in a.blobs]
    img = RegistryClient(a.registry).push_image(a.name, a.tag, layers)
    return {"name": img.name, "tag": img.tag, "manifest_digest": img.manifest_digest,
            "layers": list(img.layers)}


def cmd_early_helper(a: argparse.Namespace) -> dict:
    from .early import helper_main
    sys.exit(helper_main())


def _fetch_meta_image(spec):
    """The published meta image, fetched in a thread while the TOC is read and the tree
    built; `.result()` gives its verified bytes, or None (logged) when it cannot be had:
    the server then builds the image itself."""
    import concurrent.futures

    from .metaimage import image_digest
    from .mount import open_source

    def fetch() -> bytes | None:
        try:
            src = open_source(dataclasses.replace(spec.source, digest=spec.meta_digest,
                                                  size=spec.meta_size))
            try:
                size = src.size()
                if size > MAX_META_IMAGE:
                    raise ValueError(f"meta image of {size} bytes (at most {MAX_META_IMAGE})")
                data = src.read(0, size)
            finally:
                src.close()
            if image_digest(data) != spec.meta_digest:
                raise ValueError(f"meta image has digest {image_digest(data)}, not "
                                 f"{spec.meta_digest}")
            return data
        except Exception as e:  # noqa: BLE001 - building it is the fallback
            logging.getLogger("lazyfs").warning("no published meta image (%s), building "
                                                "it: %s", spec.meta_digest, e)
            return None
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lazyfs-meta")
    fut = pool.submit(fetch)
    pool.shutdown(wait=False)
    return fut


def cmd_serve(a: argparse.Namespace) -> dict:
    from .cache import ChunkCache
    from .fuse import serve
    from .mount import MountSpec, open_source
    from .early import spawn_helper, start_prefetch
    from .reader import open_estargz, read_toc
    from .view import LayerView, Recorder
    # imports first: a spare server (mount.spawn_server) has them done when its spec comes,
    # and its early-prefetch helper (early.py) started
    helper = spawn_helper() if EARLY else None
    text = sys.stdin.read()
    if not text.strip():
        if helper is not None:
            helper.stdin.close()      # type: ignore[union-attr]
        return {}                     # a spare that was not used: its owner went away
    spec = MountSpec.from_json(text)
    if spec.log_path:                 # a spare server: from now on, the mount's log
        fd = os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    t0 = time.monotonic()
    meta_image = _fetch_meta_image(spec) if spec.view_dir and spec.meta_digest else None
    src = open_source(spec.source)
    try:
        raw = read_toc(src, spec.toc_digest)
    except BaseException:
        if helper is not None:
            helper.stdin.close()      # type: ignore[union-attr]
        raise
    early = None
    if helper is not None:
        if spec.prefetch and spec.view_dir and spec.workset and not spec.fetch_all:
            # the working set decoded by the helper on the other core while this builds
            # the tree and the meta tree
            early = start_prefetch(helper, raw, dataclasses.asdict(spec.source),
                                   spec.cache_dir, os.path.join(spec.view_dir, "data"),
                                   spec.log_path)
        else:
            helper.stdin.close()      # type: ignore[union-attr]
    # the TOC becomes ~100,000 long-lived objects: collecting while they are made costs
    # ~0.1 s of the mount, and traversing them later costs every collection of the server
    gc.disable()
    try:
        blob = open_estargz(src, spec.toc_digest, raw=raw)
        gc.freeze()
    finally:
        gc.enable()
    logging.getLogger("lazyfs").info("serving %s (%d inodes, TOC %s%s) at %s; TOC read and "
                                     "parsed in %.3fs", src.describe(), len(blob.tree.nodes),
                                     blob.toc_digest, "" if spec.toc_digest else " unverified",
                                     spec.mountpoint, time.monotonic() - t0)
    layer = spec.source.digest or spec.source.location
    rec = Recorder(spec.record_path, layer) if spec.record_path else None
    cache = ChunkCache(spec.cache_dir)
    # the node's cache pruning spares the chunks of a layer that is being served
    cache.pin([c.digest for c in blob.tree.chunks_in_order])
    try:
        view = LayerView(blob, cache, rec)
        serve(view, spec.mountpoint, fsname=f"lazyfs:{layer[:19]}", prefetch=spec.prefetch,
              fetch_all=spec.fetch_all, status_path=spec.status_path,
              allow_other=spec.allow_other, view_dir=spec.view_dir, workset=spec.workset,
              workset_only=spec.workset_only, early=early,
              meta_image=meta_image.result if meta_image is not None else None)
    finally:
        if early is not None:
            early.kill()
        cache.flush()                 # chunks fetched last are on disk for the next mount
        cache.unpin()
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazyfs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="write a layer dir as an eStargz blob")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--prioritized-from", help="access record JSON from a mount")
    p.add_argument("--prioritize", action="append", help="a path to put first (repeatable)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--skip-devices", action="store_true",
                   help="leave device nodes out (e.g. a base rootfs's /dev) instead of failing")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("inspect", help="read and check a blob's footer and TOC")
    _source_args(p, True)
    p.add_argument("--verify", action="store_true", help="also fetch and verify every chunk")
    p.add_argument("--list", action="store_true", help="list the paths")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("mount", help="mount a blob lazily (read-only FUSE)")
    p.add_argument("mountpoint")
    _source_args(p, False)
    p.add_argument("--cache")
    p.add_argument("--record")
    p.add_argument("--status")
    p.add_argument("--log")
    p.add_argument("--no-prefetch", action="store_true")
    p.set_defaults(fn=cmd_mount)
    p = sub.add_parser("unmount", help="unmount a lazy mount")
    p.add_argument("mountpoint")
    p.set_defaults(fn=cmd_unmount)
    p = sub.add_parser("push", help="push eStargz blobs as one image to a registry")
    p.add_argument("--registry", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("blobs", nargs="+")
    p.set_defaults(fn=cmd_push)
    p = sub.add_parser("serve", help="internal: serve a MountSpec read from stdin")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("early-helper", help="internal: a mount server's prefetch helper")
    p.set_defaults(fn=cmd_early_helper)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(message)s")
    try:
        out = a.fn(a)
    except (LazyFSError, OSError, ValueError) as e:
        print(f"lazyfs {a.cmd}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if out:
        print(json.dumps(out, indent=1))
    return 0
