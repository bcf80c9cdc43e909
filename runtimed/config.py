"""Where runtimed keeps its state, and the defaults a user can override by env."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default))


DEFAULT_PORT = 8470


@dataclass(frozen=True)
class Paths:
    """Filesystem layout of one runtimed installation (dispatcher + node state).

    Paths are short on purpose: overlayfs takes all lower dirs in one mount
    option string limited to a page.
    """

    state: Path                       # /var/lib/runtimed
    cache: Path                       # /var/cache/runtimed (base rootfs, set up by scripts/)
    criu: Path                        # CRIU wrapper from scripts/setup.sh

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(
            state=_env_path("RUNTIMED_STATE", "/var/lib/runtimed"),
            cache=_env_path("RUNTIMED_CACHE", "/var/cache/runtimed"),
            criu=_env_path("RUNTIMED_CRIU", "/opt/runtimed/criu/criu"),
        )

    @property
    def base_rootfs(self) -> Path:
        return self.cache / "base" / "bookworm-py311"

    @property
    def token_file(self) -> Path:
        return self.state / "token"

    @property
    def dispatcher_dir(self) -> Path:
        return self.state / "d"

    def node_dir(self, node_name: str) -> Path:
        return self.state / "n" / node_name


def ensure_token(paths: Paths) -> str:
    """Create the token file (0600, created exclusively) on first start; return the token."""
    import secrets

    paths.state.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(paths.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(paths.token_file, 0o600)
        return paths.token_file.read_text().strip()
    with os.fdopen(fd, "w") as f:
        tok = secrets.token_urlsafe(32)
        f.write(tok + "\n")
    return tok
