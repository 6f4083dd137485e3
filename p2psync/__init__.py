"""p2psync: peer-to-peer sync of SQLite databases over the local network."""

__version__ = "0.1.0"
