"""Version vectors: site id -> highest db version of that site fully received."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

SITE_ID_LEN = 16


class VersionVector(Mapping[bytes, int]):
    """An immutable version vector; missing sites count as 0."""

    __slots__ = ("_v",)

    def __init__(self, entries: Mapping[bytes, int] | None = None):
        v = {}
        for site, n in (entries or {}).items():
            if not isinstance(site, bytes) or len(site) != SITE_ID_LEN:
                raise ValueError(f"site id must be {SITE_ID_LEN} bytes, got {site!r:.40}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n >= 1 << 63:
                raise ValueError(f"db version must be an int in [0, 2^63), got {n!r:.40}")
            if n:
                v[site] = n
        self._v = v

    def __getitem__(self, site: bytes) -> int:
        return self._v.get(site, 0)

    def get(self, site: bytes, default: int = 0) -> int:  # type: ignore[override]
        return self._v.get(site, default)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VersionVector):
            return self._v == other._v
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._v.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.hex()[:8]}:{n}" for s, n in sorted(self._v.items()))
        return f"VersionVector({{{inner}}})"

    def merge(self, other: Mapping[bytes, int]) -> VersionVector:
        """The pointwise maximum of two vectors."""
        out = dict(self._v)
        for s, n in other.items():
            if n > out.get(s, 0):
                out[s] = n
        return VersionVector(out)

    def with_entry(self, site: bytes, n: int) -> VersionVector:
        """A copy with ``site`` set to ``n``."""
        out = dict(self._v)
        out[site] = n
        return VersionVector(out)

    def dominates(self, other: Mapping[bytes, int]) -> bool:
        """True if this vector is >= ``other`` at every site."""
        return all(self[s] >= n for s, n in other.items())

    def lacking(self, other: Mapping[bytes, int]) -> dict[bytes, tuple[int, int]]:
        """Per site, the range (ours, theirs] that ``other`` has and we lack."""
        return {s: (self[s], n) for s, n in other.items() if n > self[s]}
