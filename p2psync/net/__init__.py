"""Sockets, streams and connections (trio): the only code here that does network I/O."""
