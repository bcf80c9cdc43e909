"""lazyfs: eStargz layers (write, read, verify) served lazily over FUSE.

The parts, in pipeline order:

    estargz.write_layer(dir, out)            overlay upper dir -> eStargz blob (LayerBlob)
    registry.RegistryClient.push_image(...)  blobs -> OCI image in a registry
    blobsource.*BlobSource                   ranged, retried, bounded reads of a blob
    reader.open_estargz(source, toc_digest)  footer + verified TOC -> tree (EStargz)
    reader.extract(blob, dest)               the whole layer, verified, in overlay form
    mount.mount_layer(...) / mount.mount()   the layer as a lazy read-only FUSE mount
                                             (a `python -m lazyfs serve` process)

Errors are the closed set in `lazyfs.errors`.
"""
from .blobsource import (BlobSource, DispatcherBlobSource, FileBlobSource, RegistryBlobSource,
                         RetryPolicy)
from .errors import (BlobNotFoundError, DigestMismatchError, FormatError, LazyFSError,
                     MountError, RegistryError, SourceError, SourceUnavailableError,
                     UnsafeEntryError)
from .estargz import LayerBlob, write_layer
from .mount import MountHandle, MountSpec, SourceSpec, mount, mount_layer, unmount
from .reader import EStargz, blob_info, extract, open_estargz
from .toc import TOC, TOC_DIGEST_ANNOTATION, TOCEntry

__all__ = ["TOC", "TOC_DIGEST_ANNOTATION", "BlobNotFoundError", "BlobSource",
           "DigestMismatchError", "DispatcherBlobSource", "EStargz", "FileBlobSource",
           "FormatError", "LayerBlob", "LazyFSError", "MountError", "MountHandle", "MountSpec",
           "RegistryBlobSource", "RegistryError", "RetryPolicy", "SourceError", "SourceSpec",
           "SourceUnavailableError", "TOCEntry", "UnsafeEntryError", "blob_info", "extract",
           "mount", "mount_layer", "open_estargz", "unmount", "write_layer"]
