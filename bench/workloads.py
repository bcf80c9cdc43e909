"""What the benchmark runs remotely: one workload per kind of cold start.

This module is pickled BY VALUE into the containers (it is the user's own module to
the SDK), so the functions and classes below must use only the standard library,
numpy (module-level, present in their images) and what `_Preload` imports inside the
container. They must not use sdk/bench at run time.

`_Preload` gives a function module-level imports of packages the client machine does
not have (pandas, scipy, sklearn, torch): the function refers to a `_Preload` global,
which unpickles in the container by importing the packages, i.e. during the agent's
`imports` span, exactly where `import pandas` at the top of a user module would run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np  # module-level import: the numpy and model workloads need it remotely

from sdk import App, Function, Image, enter, method

from .runtime import gpu_present

NUMPY = "numpy==1.26.4"
# cp311 wheels the host's pip gets from its local wheel dirs (checked with pip download;
# scipy 1.14.1 / scikit-learn 1.5.2 come only from PyPI, these install offline).
HEAVY_PKGS = (NUMPY, "pandas==2.2.3", "scipy==1.13.1", "scikit-learn==1.6.1")
TORCH = "torch==2.13.0"
MODEL_BYTES = 300 * 2**20          # state the model workload builds in @enter(snap=True)
MODEL_FLOATS = MODEL_BYTES // 4


# -- remote code ----------------------------------------------------------------------------
def _import_all(names):
    import importlib
    return _Preload(*names, mods=tuple(importlib.import_module(n) for n in names))


class _Preload:
    def __init__(self, *names, mods=()):
        self.names, self.mods = names, mods

    def __reduce__(self):
        return (_import_all, (self.names,))


_HEAVY = _Preload("numpy", "pandas", "scipy", "scipy.stats", "scipy.optimize", "sklearn",
                  "sklearn.linear_model", "sklearn.ensemble")
_TORCH = _Preload("torch")


def noop(x):
    return x


def numpy_fn(x):
    return float(np.float64(x) * 2.0)


def heavy(x):
    return x if _HEAVY.names else None


class Model:
    @enter(snap=True)
    def load(self):                      # ~300 MB of "weights", built once per container
        self.weights = np.random.default_rng(0).random(MODEL_FLOATS, dtype=np.float32)

    @method()
    def infer(self, i):
        return float(self.weights[i])


def cuda_fn(x):
    torch = _TORCH.mods[0]
    t = torch.ones(1 << 20, device="cuda")
    return float(t.sum().item()) + x


# -- workload table -------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    image: Callable[[], Image]           # a fresh Image per App (the SDK caches by id)
    target: Any                          # function, or class for `method`
    method: str | None = None
    options: dict = field(default_factory=dict)
    args: tuple = (1,)
    expect: Any = None                   # the return value a correct call gives
    quick: bool = False                  # part of --quick
    skip: Callable[[], str | None] = lambda: None    # reason to skip here, or None

    def register(self, app: App, **extra) -> Function:
        opts = dict(self.options, **extra)
        if self.method:
            return getattr(app.cls(image=self.image(), **opts)(self.target), self.method)
        return app.function(image=self.image(), **opts)(self.target)


def _no_gpu() -> str | None:
    ok, why = gpu_present()
    if not ok:
        return why
    return ("a GPU is present, but the node passes no GPU devices into containers yet "
            "(bundle.devices is never set by runtimed/node.py) and the local torch wheel "
            "is a CPU build")


BASE = {"cpu": 1.0, "timeout": 300, "scaledown_window": 900}
WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("noop", "stdlib only: returns its argument", Image.debian_slim, noop,
             options=dict(BASE, memory=128), expect=1, quick=True),
    Workload("numpy", f"module-level `import numpy` ({NUMPY})",
             lambda: Image.debian_slim().pip_install(NUMPY), numpy_fn,
             options=dict(BASE, memory=256), expect=2.0, quick=True),
    Workload("heavy", "module-level imports of numpy, pandas, scipy(.stats,.optimize), "
             "sklearn(.linear_model,.ensemble): " + " ".join(HEAVY_PKGS),
             lambda: Image.debian_slim().pip_install(*HEAVY_PKGS), heavy,
             options=dict(BASE, memory=512), expect=1),
    Workload("model", f"@app.cls, @enter(snap=True) builds {MODEL_BYTES >> 20} MiB of numpy "
             "state; method returns one weight", lambda: Image.debian_slim().pip_install(NUMPY),
             Model, method="infer", options=dict(BASE, memory=1536), args=(7,)),
    Workload("cuda", f"module-level `import torch` ({TORCH}), a CUDA tensor op",
             lambda: Image.debian_slim().pip_install(TORCH), cuda_fn,
             options=dict(BASE, memory=4096, gpu="any"), skip=_no_gpu),
]}


def selected(names: list[str] | None, quick: bool) -> list[Workload]:
    if names:
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            raise SystemExit(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
        return [WORKLOADS[n] for n in names]
    return [w for w in WORKLOADS.values() if w.quick or not quick]
