"""python -m bench coldstart [--quick] [--out DIR] [--repeats N]
python -m bench foundation [--out DIR]
python -m bench cost [flags]

All talk to the runtime at $RUNTIMED_URL (default http://127.0.0.1:8470, token from
$RUNTIMED_TOKEN or /var/lib/runtimed/token); `--start` runs a private one instead
(`python -m runtimed.cli up --port P` with a temporary RUNTIMED_STATE), stopped at the end.
The coldstart row restore_peer joins a second node daemon of its own to that runtime for
the run (the runtime must be on this machine); while it is there every call is pinned.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

DEFAULT_OUT = str(Path(__file__).resolve().parent / "results")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    p.add_argument("--start", action="store_true",
                   help="start a private runtime for this run and stop it at the end")
    p.add_argument("--port", type=int, default=None, help="--start: dispatcher port")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("coldstart", help="phase table per workload x strategy, plots")
    _common(c)
    c.add_argument("--quick", action="store_true",
                   help="noop + numpy only, 2 repeats (< 3 min with a warm layer cache)")
    c.add_argument("--repeats", type=int, default=None, help="samples per cell (5; quick 2)")
    c.add_argument("--workloads", nargs="+", default=None, help="subset, e.g. noop numpy")
    c.add_argument("--strategies", nargs="+", default=None, help="subset, e.g. cold restore")
    c.add_argument("--warmup", type=int, default=1,
                   help="unmeasured cold/restore calls per cell before round 1")
    c.add_argument("--settle-s", type=float, default=0.2,
                   help="pause after a drain so the evicted container's teardown ends")
    c.add_argument("--keep-snapshots", action="store_true",
                   help="keep the snapshots the run took (default: removed at the end)")

    f = sub.add_parser("foundation", help="warm round trip, .local overhead, numpy cold "
                       "start, image build cold vs cached")
    _common(f)
    f.add_argument("--calls", type=int, default=300)
    f.add_argument("--warmup", type=int, default=20)
    f.add_argument("--cold-repeats", type=int, default=5)
    f.add_argument("--cold-warmup", type=int, default=1,
                   help="unmeasured cold starts before the measured ones")
    f.add_argument("--settle-s", type=float, default=0.2)

    k = sub.add_parser("cost", help="GPU-hours/day: no pool vs warm pool vs snapshots")
    _common(k)
    k.add_argument("--requests-per-day", type=float, default=1000)
    k.add_argument("--duration-s", type=float, default=2.0)
    k.add_argument("--cold-start-s", type=float, default=30.0)
    k.add_argument("--restore-s", type=float, default=0.1)
    k.add_argument("--warm-hit-rate", type=float, default=0.9)
    k.add_argument("--pool-size", type=int, default=1)
    k.add_argument("--idle-timeout-s", type=float, default=0.0)
    k.add_argument("--price-per-gpu-hour", type=float, default=2.50)
    k.add_argument("--coldstart", default=None,
                   help="coldstart.json with measured numbers (default OUT/coldstart.json)")
    k.add_argument("--workload", default=None,
                   help="workload whose cold/restore p50 the measured variant uses")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:              # own parser and own cluster: bench/cluster.py
        from .cluster import main as cluster_main
        return cluster_main(argv[1:])
    args = parser().parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.cmd == "cost":           # offline: no runtime needed
        from . import cost
        res, text = cost.run(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost.json").write_text(json.dumps(res, indent=1) + "\n")
        print(text)
        print(f"\nwrote {out / 'cost.json'}")
        return 0

    from .runtime import private_runtime
    with private_runtime(args.port) if args.start else contextlib.nullcontext():
        if args.cmd == "coldstart":
            from . import coldstart, report
            res = coldstart.run(args)
            md = report.write_coldstart(res, out)
            print(md)
            print(f"wrote {out}/coldstart.json, coldstart.md, "
                  + ", ".join(Path(p).name for p in res.get("plots", [])))
            bad = [r for r in res["results"] if r["status"] == "error"]
            rc = 1 if bad else 0
        else:
            from . import foundation
            res = foundation.run(args)
            out.mkdir(parents=True, exist_ok=True)
            (out / "foundation.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            print(foundation.table(res))
            print(f"wrote {out / 'foundation.json'}")
            rc = 0
    print(f"[bench] {args.cmd} took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
