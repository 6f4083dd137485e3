"""The store interface the sync engine talks to (SQLite on devices, Postgres on relays)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..model import Batch, VersionVector


@dataclass(frozen=True)
class ApplyResult:
    """What one ``apply`` did."""

    cells_won: int = 0          # registers that took the incoming write
    held: int = 0               # changes stored aside (unknown table/column, clock skew)
    vv: VersionVector = field(default_factory=VersionVector)
    refused: dict = field(default_factory=dict)    # site -> changes no valid proof covered (not applied)
    refusals: tuple = ()        # one sentence per version refused, for the log
    cut: dict = field(default_factory=dict)        # site -> (range end claimed, end kept): unattested ranges
    conflicts: int = 0          # versions signed twice with different contents (a clone or a rollback)
    bad_proofs: int = 0         # proofs with a signature that does not verify (a forger: honest peers check first)
    behind: int | None = None   # a peer holds our own site's versions past this one, or other contents for them:
                                # this database was rolled back or cloned (SqliteStore._behind)


@dataclass(frozen=True)
class HeldChange:
    """A change stored but not applied, and why."""

    id: int
    reason: str
    table: str
    hlc: int


class Store(Protocol):
    """What the sync engine needs from a store."""

    site_id: bytes

    def version_vector(self) -> VersionVector: ...

    def schema_fingerprint(self) -> bytes: ...

    def stamp(self, now_ms: int) -> int | None: ...

    def changes_since(self, vv: VersionVector, max_changes: int, max_bytes: int) -> Iterator[tuple[Batch, bool]]: ...

    def apply(self, batch: Batch, now_ms: int) -> ApplyResult: ...

    def held(self) -> list[HeldChange]: ...

    def release_held(self, now_ms: int, force: bool = False) -> int: ...

    def close(self) -> None: ...
