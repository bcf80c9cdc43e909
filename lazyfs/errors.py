"""The closed set of errors lazyfs raises; callers test by class.

    LazyFSError
    ├── FormatError               the blob is not valid eStargz (footer, TOC, gzip, tar, bounds)
    │   ├── DigestMismatchError   content differs from the digest that names it (TOC, chunk, blob)
    │   └── UnsafeEntryError      an entry would leave the layer root ('..', absolute path,
    │                             hard link out of the tree, path through a non-directory)
    │                             or is not allowed in a layer (device node, reserved name)
    ├── SourceError               a blob source failed to answer
    │   ├── BlobNotFoundError     the source says the blob does not exist (404)
    │   └── SourceUnavailableError  5xx / timeouts / connection errors after bounded retries
    ├── RegistryError             the registry refused a push or answered out of protocol
    └── MountError                mounting or unmounting the FUSE filesystem failed

In containerd's errdefs terms: FormatError ~ InvalidArgument/DataLoss, BlobNotFoundError ~
NotFound, SourceUnavailableError ~ Unavailable, MountError ~ FailedPrecondition. The FUSE
server maps every SourceError and FormatError met while serving a read to EIO.
"""
from __future__ import annotations

__all__ = [
    "BlobNotFoundError",
    "DigestMismatchError",
    "FormatError",
    "LazyFSError",
    "MountError",
    "RegistryError",
    "SourceError",
    "SourceUnavailableError",
    "UnsafeEntryError",
]


class LazyFSError(Exception):
    """Base class of every lazyfs error."""


class FormatError(LazyFSError):
    """The blob is not a valid eStargz layer, or its TOC points outside the blob."""


class DigestMismatchError(FormatError):
    """Bytes do not match the digest recorded for them (TOC digest, chunkDigest, blob digest)."""

    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(f"{what}: expected {expected}, content has {actual}")
        self.what, self.expected, self.actual = what, expected, actual


class UnsafeEntryError(FormatError):
    """An entry would write or resolve outside the layer root, or is forbidden in a layer."""

    def __init__(self, name: str, why: str):
        super().__init__(f"refusing layer entry {name!r}: {why}")
        self.name, self.why = name, why


class SourceError(LazyFSError):
    """A BlobSource could not deliver the bytes asked for."""


class BlobNotFoundError(SourceError):
    """The blob does not exist at the source (no retry helps)."""


class SourceUnavailableError(SourceError):
    """The source failed (5xx, timeout, refused connection) on every bounded retry."""


class RegistryError(LazyFSError):
    """An OCI registry refused an operation or answered outside the distribution protocol."""


class MountError(LazyFSError):
    """The FUSE mount could not be set up or torn down."""
