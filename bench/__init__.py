"""The cold-start benchmark harness: `python -m bench coldstart|foundation|cost`.

Modules: workloads (what runs remotely), strategies (how a call is made to start:
cold, warm, restore, ... as one table), phases (runtime spans -> the seed's phases),
coldstart / foundation (the runs), report (JSON, markdown, plots), cost (GPU-hours
model), runtime (talking to, or starting, a runtime), stats (percentiles).
"""
