"""LAN discovery: mDNS/DNS-SD via zeroconf, crossing into trio through one portal."""

from .mdns import (
    SERVICE_TYPE,
    DiscoveryError,
    MdnsDiscovery,
    PeerGone,
    PeerSeen,
    site_id_of,
    tag_matches,
    txt_properties,
)
from .portal import ThreadPortal

__all__ = [
    "DiscoveryError", "MdnsDiscovery", "PeerGone", "PeerSeen", "SERVICE_TYPE", "ThreadPortal",
    "site_id_of", "tag_matches", "txt_properties",
]
