"""Map the spans a call result carries (`fn.last_call.info["spans"]`) to the seed's
cold-start phases.

Span semantics (runtimed/node.py, container.py, snapshots.py):
  queue            node: from receiving the call to a container taking it. For a call
                   that starts a container this INCLUDES the whole start (the call waits
                   in the pool queue while the container is made), so scheduling is
                   queue minus the start spans below.
  image            ensure image layers + fetch the function blob
  snapshot_pull    the snapshot's manifest and missing chunks fetched from a peer node
                   (restore_peer only), before materialize
  materialize      snapshot dir ready for restore (hot copy or from chunks)
  netns, upper_restore, rootfs, lazy_daemon, runc_run | runc_restore | criu_restore | fork
  agent_ready      init frame sent -> agent ready: interpreter boot + imports + enter
  agent_snap_point same, up to the snapshot point (snapshot-taking cold start); then
                   agent_ready is only resume + non-snap enter hooks
  imports, enter   inside agent_*: cloudpickle.loads of the function (module-level
                   imports) and the @enter hooks
  checkpoint       the snapshot of a snapshot-taking cold start (guard+dump+store)
  resume           restored agent: reseed + non-snap @enter hooks
  execute          the user function itself; call = the whole call on the channel

Phases (ms), which sum to the client-measured total by construction:
  scheduling    queue - start spans (warm: queue), plus nothing else
  image         image
  transfer      snapshot_pull
  container     materialize + netns + upper_restore + rootfs + lazy_daemon
                + runc_run/runc_restore/criu_restore + fork
  interpreter   agent_snap_point + agent_ready - imports - enter (>= 0)
  imports       imports
  app_init      enter + resume
  checkpoint    checkpoint (only a snapshot-taking call has it)
  first_result  total - all of the above: the call on the channel (execute + framing)
                plus the SDK -> dispatcher -> node round trip and result delivery
"""
from __future__ import annotations

PHASES = ("scheduling", "image", "transfer", "container", "interpreter", "imports",
          "app_init", "checkpoint", "first_result")
CONTAINER_SPANS = ("materialize", "netns", "upper_restore", "rootfs", "lazy_daemon",
                   "runc_run", "runc_restore", "criu_restore", "fork")
AGENT_SPANS = ("agent_snap_point", "agent_ready")


def _g(spans: dict, k: str) -> float:
    try:
        return float(spans.get(k) or 0.0)
    except (TypeError, ValueError):
        return 0.0


def phases_of(spans: dict, total_ms: float) -> dict[str, float]:
    """The phase breakdown of one call (ms). `spans` as the runtime returns them."""
    image = _g(spans, "image")
    transfer = _g(spans, "snapshot_pull")
    container = sum(_g(spans, k) for k in CONTAINER_SPANS)
    agent = sum(_g(spans, k) for k in AGENT_SPANS)
    imports, enter, resume = _g(spans, "imports"), _g(spans, "enter"), _g(spans, "resume")
    checkpoint = _g(spans, "checkpoint")
    interpreter = max(0.0, agent - imports - enter)
    # fork happens inside the call on a warm zygote, not while the call is queued
    start = image + transfer + container - _g(spans, "fork") + agent + resume + checkpoint
    scheduling = max(0.0, _g(spans, "queue") - start)
    out = {"scheduling": scheduling, "image": image, "transfer": transfer, "container": container,
           "interpreter": interpreter, "imports": imports, "app_init": enter + resume,
           "checkpoint": checkpoint}
    out["first_result"] = max(0.0, total_ms - sum(out.values()))
    return {k: round(v, 3) for k, v in out.items()}
