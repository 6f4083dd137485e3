"""Errors raised by stores."""


class StoreError(Exception):
    """A store operation failed; the message says what and what to do."""


class NotTrackable(StoreError):
    """A table cannot be tracked (no primary key, missing, virtual...)."""
