"""The sync engine: per-peer decisions about what to send and when to apply (no I/O)."""

from .peer import GroupTooLarge, PeerSync

__all__ = ["GroupTooLarge", "PeerSync"]
