"""
The registry's named exceptions: every failure a user can cause has one, with a one-line message.

The CLI turns any `RegistryError` into `error: <message>` on stderr and a non-zero exit; the app shows
the message with `st.error`. Database driver errors never leave the store raw: `registry.db` maps them
to `RegistryDatabaseError` (or a more specific class below) inside its session scope. This module holds
no logic beyond the messages.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class: a problem the user can act on, described in one line."""


class RegistryNotFoundError(RegistryError):
    """No registry database where one was asked for (and creating it was not allowed)."""


class NotARegistryError(RegistryError):
    """The database exists but is not a nanochat registry (another SQLite file, another app's schema)."""


class SchemaTooOldError(RegistryError):
    """The database has an older schema; the message names the exact command that migrates it."""


class SchemaTooNewError(RegistryError):
    """The database was written by a newer version of this code."""


class RegistryDatabaseError(RegistryError):
    """The database refused an operation (connection refused, disk full, permission...)."""


class RegistryReadOnlyError(RegistryDatabaseError):
    """A write (scan, check, import) asked of a registry opened read-only (a file or folder we cannot write)."""


class RegistryBusyError(RegistryDatabaseError):
    """SQLite stayed locked by another writer for longer than the busy timeout."""


class ScanPathError(RegistryError):
    """A path given to scan does not exist or cannot be read."""


class NoCheckpointsError(ScanPathError):
    """A folder with no checkpoints (and no run the registry already knew there)."""


class RunNotFoundError(RegistryError):
    """A RUN reference (id, tag, phase/tag or path) that matches no indexed run."""


class AmbiguousRunError(RunNotFoundError):
    """A RUN reference that matches several runs; `candidates` lists them as (id, label, path)."""

    def __init__(self, ref: str, candidates: list[tuple[int, str, str]]):
        self.ref = ref
        self.candidates = candidates
        shown = "; ".join(f"id {i}: {label} ({path})" for i, label, path in candidates[:6])
        more = f" and {len(candidates) - 6} more" if len(candidates) > 6 else ""
        super().__init__(f"{ref!r} matches {len(candidates)} runs: {shown}{more}. "
                         "Use the run id, its phase/tag, or its path")


class CheckpointNotIndexedError(RegistryError):
    """A checkpoint reference (RUN@STEP, a file path, an id) that is not in the registry."""


class LogImportError(RegistryError):
    """An upstream console log that cannot be read at all (not: a few malformed lines, which are counted)."""


class ResumePlanError(RegistryError):
    """A run the resume planner cannot plan for: bad path, no checkpoints, several runs in one folder."""


class NothingResumableError(ResumePlanError):
    """Every checkpoint of the run failed its check; `skipped` lists each (resume.SkippedCheckpoint) and why."""

    def __init__(self, message: str, skipped: tuple = ()):
        super().__init__(message)
        self.skipped = skipped


class TargetBelowStepError(ResumePlanError):
    """A target number of steps below the step the resume would start from (training cannot go back)."""
