"""Snapshots: `runtimectl run examples/snapshot_demo.py`.

The first cold start runs the imports and `@enter(snap=True)`, the node checkpoints
the container at that point, and every later cold start restores the snapshot.
"""
import time

import numpy as np  # noqa: F401  (module-level import: done before the snapshot point)

from sdk import App, Image, enter, method

app = App("snapshot-demo")
image = Image.debian_slim().pip_install("numpy==1.26.4")


@app.function(image=image, snapshot=True, memory=512, scaledown_window=2)
def rand_pair(x):
    import random
    import uuid
    return x, random.random(), str(uuid.uuid4())[:8], float(np.random.rand())


@app.cls(image=image, enable_memory_snapshot=True, memory=512, scaledown_window=2)
class Model:
    @enter(snap=True)
    def load(self):                      # runs once, before the snapshot
        self.weights = np.arange(2_000_000, dtype=np.float64)

    @enter()
    def connect(self):                   # runs after every start or restore
        self.ready_at = time.time()

    @method()
    def infer(self, i):
        return float(self.weights[i] * 2)


@app.local_entrypoint()
def main():
    for fn, args, label in [(rand_pair, (1,), "rand_pair"), (Model().infer, (21,), "Model.infer")]:
        for attempt in range(3):
            t = time.perf_counter()
            out = fn.remote(*args)
            ms = (time.perf_counter() - t) * 1000
            info = fn.last_call.info
            print(f"{label} call {attempt + 1}: {ms:6.0f} ms  tier={info.get('tier'):8s} "
                  f"{info.get('snapshot', '')}  -> {out}")
            time.sleep(3)    # past scaledown_window: the next call needs a new container
