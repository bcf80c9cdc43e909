"""The demo: `runtimectl run examples/hello.py` (README's first command runs it)."""
import time

from sdk import App, Image

app = App("hello")
image = Image.debian_slim().pip_install("numpy==1.26.4").env({"GREETING": "hi"})


@app.function(image=image, cpu=1, memory=512, timeout=60, retries=1)
def square(x):
    import os

    import numpy as np
    print(f"{os.environ.get('GREETING', 'hello')} from the container, squaring {x}")
    return int(np.square(x))


@app.local_entrypoint()
def main():
    assert square.local(3) == 9
    t = time.perf_counter()
    assert square.remote(3) == 9
    print(f"first .remote(): {(time.perf_counter() - t) * 1000:.0f} ms "
          f"(tier {square.last_call.info.get('tier')})")
    t = time.perf_counter()
    assert square.remote(4) == 16
    print(f"second .remote(): {(time.perf_counter() - t) * 1000:.1f} ms "
          f"(tier {square.last_call.info.get('tier')})")
    assert list(square.map(range(10))) == [i * i for i in range(10)]
    call = square.spawn(4)
    assert call.get(timeout=30) == 16
    print("all good:", call.object_id, call.info.get("tier"), call.info.get("spans"))
