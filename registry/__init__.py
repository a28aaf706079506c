"""
The nanochat run registry: an index of runs, checkpoints, metadata and metrics in SQLite (or
PostgreSQL), with history queries and a CLI (`python -m registry`).

Public entry points: `open_store(url_or_path=None, create=True, origin=None) -> RegistryStore` and
`registry.scanner.scan_path(store, path, progress=None, origin=None) -> ScanReport`. Importing this package pulls
in neither torch nor streamlit.
"""

from registry.errors import (
    AmbiguousRunError,
    CheckpointNotIndexedError,
    NoCheckpointsError,
    NotARegistryError,
    RegistryError,
    RunNotFoundError,
    ScanPathError,
    SchemaTooNewError,
    SchemaTooOldError,
)
from registry.store import RegistryStore, open_store

__all__ = ["open_store", "RegistryStore", "RegistryError", "AmbiguousRunError", "CheckpointNotIndexedError",
           "NoCheckpointsError", "NotARegistryError", "RunNotFoundError", "ScanPathError", "SchemaTooNewError",
           "SchemaTooOldError"]
