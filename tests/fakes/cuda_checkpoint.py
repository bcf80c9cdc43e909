#!/usr/bin/env python3
"""A stand-in for NVIDIA's cuda-checkpoint, for tests on machines without a GPU.

Copy it (with `install`) into a directory with a fake.json next to it:
    {"help": <the --help text to print>, "fail": <op>, "hang": <op>}
where op is get-state, toggle, lock, checkpoint, restore or unlock. It follows the real
tool's state machine, one state file per pid next to itself (running -lock-> locked
-checkpoint-> checkpointed -restore-> locked -unlock-> running; --toggle does running <->
checkpointed), and logs every invocation: its arguments to calls.log, and for a pid that
exists, one JSON line to procs.log with the op, the host pid, the pid inside its pid
namespace (NSpid) and the libcuda.so* file it maps (the tests' stand-in for a context).

A restored process is a pid it has never seen: it starts `checkpointed` when the same
namespace pid mapping a libcuda of the same dir and name was left checkpointed by a suspend before
(the CUDA state inside a CRIU image is the suspended one), else `running`.
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def proc_identity(pid: str) -> dict:
    out = {}
    try:
        for line in read(f"/proc/{pid}/status").splitlines():
            if line.startswith("NSpid:"):
                out["nspid"] = int(line.split()[-1])
        for line in read(f"/proc/{pid}/maps").splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libcuda.so"):
                out["libcuda"] = parts[5].strip()
                break
    except OSError:
        pass
    return out


def main(args: list[str]) -> int:
    cfg = json.loads(read(os.path.join(HERE, "fake.json")))
    with open(os.path.join(HERE, "calls.log"), "a") as log:
        log.write(" ".join(args) + "\n")
    if "--help" in args:
        print(cfg["help"])
        return 0
    pid = args[args.index("--pid") + 1]
    op = "get-state" if "--get-state" in args else "toggle" if "--toggle" in args else \
        args[args.index("--action") + 1] if "--action" in args else "?"
    ident = proc_identity(pid)
    if ident:
        with open(os.path.join(HERE, "procs.log"), "a") as log:
            log.write(json.dumps(dict(ident, op=op, pid=int(pid))) + "\n")
    sf = os.path.join(HERE, "state-" + pid)
    images = os.path.join(HERE, "images.json")     # identities left checkpointed by a suspend
    # the libcuda's dir and name: a restored container maps it from another overlay
    key = f"{ident.get('nspid')}:{'/'.join(ident.get('libcuda', '').split('/')[-2:])}"
    seen = json.loads(read(images)) if os.path.exists(images) else {}
    if os.path.exists(sf):
        state = read(sf)
    else:
        state = "checkpointed" if ident and seen.get(key) == "checkpointed" else "running"
    if op == cfg.get("hang"):
        time.sleep(30)
    if op == cfg.get("fail"):
        print(f"Error: could not {op} pid {pid}: CUDA_ERROR_NOT_SUPPORTED", file=sys.stderr)
        return 1
    if op == "get-state":
        print(state)
        return 0
    moves = {("toggle", "running"): "checkpointed", ("toggle", "checkpointed"): "running",
             ("lock", "running"): "locked", ("checkpoint", "locked"): "checkpointed",
             ("restore", "checkpointed"): "locked", ("unlock", "locked"): "running"}
    if (op, state) not in moves:
        print(f"Error: {op} is not valid in state {state}", file=sys.stderr)
        return 2
    new = moves[(op, state)]
    with open(sf, "w") as f:
        f.write(new)
    if ident and new == "checkpointed" and not seen.get(key):
        seen[key] = new          # only the first suspend: later ones are of restored copies
        with open(images, "w") as f:
            json.dump(seen, f)
    return 0


def install(directory, python: str = sys.executable, **cfg) -> str:
    """Copy this fake into `directory` as cuda-checkpoint, run by `python`, configured by
    `cfg` (help, fail, hang). Returns its path."""
    os.makedirs(directory, exist_ok=True)
    exe = os.path.join(directory, "cuda-checkpoint")
    body = read(os.path.abspath(__file__)).split("\n", 1)[1]
    with open(exe, "w") as f:
        f.write(f"#!{python}\n{body}")
    os.chmod(exe, 0o755)
    configure(directory, **cfg)
    return exe


def configure(directory, **cfg) -> None:
    with open(os.path.join(str(directory), "fake.json"), "w") as f:
        json.dump(cfg, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
