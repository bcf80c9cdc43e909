"""A throwaway local OCI registry (Debian's `docker-registry`) for tests and development.

    python -m lazyfs.devregistry DIR [--port P]     # runs in the foreground, prints the URL

Debian's default /etc/docker/registry/config.yml turns on password auth, so this writes
its own config: filesystem storage under DIR/storage, no auth, 127.0.0.1 only, access log
on (the tests sum `http.response.written` from it to count bytes served).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalRegistry", "free_port"]

CONFIG = """version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""
_WRITTEN = re.compile(r'http\.response\.written=(\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """start() / kill() / start() again on the same port and storage; stop() at the end."""

    def __init__(self, workdir: str | os.PathLike, port: int | None = None,
                 binary: str = "docker-registry"):
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen | None = None
        self.config = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(root=self.dir / "storage", port=self.port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> LocalRegistry:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "serve", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"docker-registry did not come up on {self.url}:\n{tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the registry vanishes mid-whatever, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def bytes_served(self, path_part: str = "/blobs/") -> int:
        """Sum of response bytes the registry logged for requests whose URI has `path_part`."""
        total = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            if path_part in line and "response completed" in line:
                m = _WRITTEN.search(line)
                if m:
                    total += int(m.group(1))
        return total

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--port", type=int)
    a = ap.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    reg = LocalRegistry(a.dir, a.port).start()
    print(reg.url, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        reg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
