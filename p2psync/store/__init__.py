"""Stores: where changes live (SQLite on devices, Postgres on relays)."""

from .base import ApplyResult, HeldChange, Store
from .errors import NotTrackable, StoreError
from .sqlite import SqliteStore

__all__ = ["ApplyResult", "HeldChange", "Store", "NotTrackable", "StoreError", "SqliteStore"]
