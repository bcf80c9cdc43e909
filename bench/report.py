"""Write a coldstart result: JSON, a markdown table, and two PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from .phases import PHASES

SHORT = {"scheduling": "sched", "image": "image", "transfer": "xfer", "container": "ctr",
         "interpreter": "interp", "imports": "imports", "app_init": "app_init",
         "checkpoint": "ckpt", "first_result": "1st_result"}


def _f(x, nd: int = 1) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Cold-start benchmark ({'quick' if env.get('quick') else 'full'})", "",
             f"{env.get('timestamp')} · kernel {env.get('kernel')} · {env.get('cpu_model')} × "
             f"{env.get('nproc')} · CRIU {env.get('criu')} · {env.get('runc')} · commit "
             f"{str(env.get('git_commit'))[:12]} · repeats {env.get('repeats')} (interleaved) · "
             f"{env.get('state')}", "",
             "Times in ms. total = client wall time of `.remote()`; phases are per-phase "
             "medians (they need not add up to the median total); ratio = p50 / p50 of the "
             "same workload's cold start.", ""]
    has_transfer = any((r.get("phases_ms") or {}).get("transfer") for r in res["results"])
    phases = [p for p in PHASES if p != "checkpoint" and (p != "transfer" or has_transfer)]
    head = ["workload", "strategy", "status", "n", "min", "p50", "p90", "ratio"] + \
        [SHORT[p] for p in phases] + ["rss MiB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in res["results"]:
        if r["status"] == "not_implemented":
            continue                    # listed once per strategy under "Not measured"
        t = r.get("total_ms") or {}
        ph = r.get("phases_ms") or {}
        status = r["status"]
        if r.get("tiers") and len(r["tiers"]) > 1:
            tiers = sorted(r["tiers"].items(), key=str)
            status += " " + ",".join(f"{k or 'none'}:{v}" for k, v in tiers)
        row = [r["workload"], r["strategy"], status, str(r.get("n", 0)), _f(t.get("min")),
               _f(t.get("p50")), _f(t.get("p90")), _f(r.get("ratio_to_cold"), 3)] + \
            [_f(ph.get(p)) for p in phases] + [_f(r.get("rss_mb_p50"), 0)]
        lines.append("| " + " | ".join(row) + " |")
    snaps = [r for r in res["results"] if (r.get("setup") or {}).get("snapshot_id")]
    if snaps:
        lines += ["", "Snapshots (taken by the first call of each `restore` cell, excluded "
                  "from its samples; new stored = bytes this snapshot added to the store after "
                  "dedup against chunks already there, e.g. from earlier runs' snapshots; "
                  "checkpoint ms = what the first call waited for: guard, CRIU dump and the "
                  "upper dir; storing the dump runs in the background after it):", "",
                  "| workload | snapshot | first call ms | checkpoint ms | dump ms | raw MiB "
                  "| new stored MiB |", "|---|---|---|---|---|---|---|"]
        for r in snaps:
            s = r["setup"]
            lines.append(f"| {r['workload']} | {s['snapshot_id']} | {_f(s['snapshot_call_ms'])} "
                         f"| {_f(s.get('checkpoint_ms'))} | "
                         f"{(s.get('snapshot_meta') or {}).get('dump_ms', '')} | "
                         f"{_f((s.get('snapshot_raw_bytes') or 0) / 2**20)} | "
                         f"{_f((s.get('snapshot_stored_bytes') or 0) / 2**20)} |")
    peer = [r for r in res["results"] if r.get("pulled")]
    if peer:
        lines += ["", ("Peer pulls (`restore_peer`: node B's snapshot store is emptied before "
                       "each call, so it fetches every chunk of the snapshot from node A; bytes "
                       "are the stored zstd chunks as sent; xfer = the node's snapshot_pull "
                       "span):"), "",
                  ("| workload | from -> to | snapshot raw MiB | chunks p50 | MiB pulled p50 "
                   "| xfer ms p50 |"), "|---|---|---|---|---|---|"]
        raw = {r["workload"]: (r.get("setup") or {}).get("snapshot_raw_bytes")
               for r in snaps if r["strategy"] == "restore"}
        for r in peer:
            s, p = r.get("setup") or {}, r["pulled"]
            raw_b = s.get("snapshot_raw_bytes") or raw.get(r["workload"])
            lines.append(f"| {r['workload']} | {s.get('home_node')} -> {s.get('peer_node')} | "
                         f"{_f(raw_b / 2**20) if raw_b else ''} | {_f(p['chunks_p50'], 0)} | "
                         f"{_f(p['bytes_p50'] / 2**20, 2)} | "
                         f"{_f((r.get('phases_ms') or {}).get('transfer'))} |")
    by = [r for r in res["results"] if r.get("by_tier")]
    if by:
        lines += ["", "Per tier the node chose (restore: eager `restore` vs `restore_lazy`):", ""]
        for r in by:
            parts = [f"{k}: n={v['n']} p50={_f(v.get('p50'))}" for k, v in r["by_tier"].items()]
            lines.append(f"- {r['workload']}/{r['strategy']}: " + "; ".join(parts))
    builds = res.get("builds") or {}
    if builds:
        lines += ["", "Deploy (image build + function registration) per variant (`built` steps "
                  "ran now; `cached` ones were layer-cache hits):", ""]
        for w, vs in builds.items():
            lines.append(f"- {w}: " + "; ".join(f"{v} {d['deploy_ms'] / 1000:.2f} s "
                                                 f"{d['steps']}" for v, d in vs.items()))
    other = [r for r in res["results"] if r["status"] in ("not_implemented", "skipped", "error")]
    if other:
        lines += ["", "Not measured:", ""]
        seen = set()
        for r in other:
            if r["status"] == "not_implemented":
                key, who = (r["strategy"], r.get("reason")), r["strategy"]
            elif r["status"] == "skipped":
                key, who = (r["workload"], r.get("reason")), f"{r['workload']} (all strategies)"
            else:
                key = who = f"{r['workload']}/{r['strategy']}"
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {who}: {r['status']}: {r.get('reason', '')}")
    inter = env.get("runtime_interruptions") or []
    lines += ["", f"Host load average (1/5/15 min) at start {env.get('loadavg_start')}, at end "
              f"{env.get('loadavg_end')} (the machine is shared). Runtime interruptions "
              f"(restarts of the shared runtime; the affected samples were retried once): "
              f"{len(inter)}."]
    ts = res.get("timing_s") or {}
    lines += ["", f"Run time: {ts.get('total')} s (deploy {ts.get('deploy')} s, setup "
              f"{ts.get('setup')} s, measured rounds {ts.get('measure')} s).", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in res["results"] if r.get("phases_ms")]
    workloads = list(dict.fromkeys(r["workload"] for r in measured))
    if not workloads:
        return []
    written = []
    colors = dict(zip(PHASES, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads) + 1.5, 4.2),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = [r for r in measured if r["workload"] == w]
        xs = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for p in PHASES:
            vals = [(r["phases_ms"].get(p) or 0.0) for r in rows]
            if any(vals):
                ax.bar(xs, vals, bottom=bottom, color=colors[p], label=p, width=0.6)
                bottom = [b + v for b, v in zip(bottom, vals)]
        for x, r in zip(xs, rows):
            ax.text(x, bottom[x], f"{r['total_ms']['p50']:.0f}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(xs, [r["strategy"] for r in rows])
        ax.set_title(w)
        ax.set_ylabel("ms (per-phase p50)")
        ax.set_ylim(0, max(bottom) * 1.15 + 1)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("Cold-start phases by strategy (label: p50 total ms)")
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.2 * len(workloads) + 1.5), 0.95))
    p = out / "coldstart_phases.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))

    samples = [s for s in res.get("samples", []) if s.get("valid")]
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.6 * len(workloads), 3.8),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for strat in dict.fromkeys(s["strategy"] for s in samples if s["workload"] == w):
            xs = sorted(s["total_ms"] for s in samples
                        if s["workload"] == w and s["strategy"] == strat)
            ys = [0.0] + [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step([xs[0]] + xs, ys, where="post", label=f"{strat} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_xlabel("total ms (log)")
        ax.set_title(w)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("fraction of calls")
    fig.suptitle(".remote() latency CDF")
    fig.tight_layout()
    p = out / "coldstart_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    return written


def write_coldstart(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "coldstart.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (out / "coldstart.md").write_text(md)
    try:
        res.setdefault("plots", plots(res, out))
    except ImportError as e:
        print(f"[bench] no plots: {e} (pip install matplotlib)")
    return md
