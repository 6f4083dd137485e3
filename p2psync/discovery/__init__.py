"""LAN discovery: mDNS/DNS-SD via zeroconf, crossing into trio through one portal."""

from .mdns import (
    SERVICE_TYPE,
    AddressTable,
    DiscoveryError,
    GroupTags,
    MdnsDiscovery,
    PeerGone,
    PeerSeen,
    instance_label,
    label_site,
    site_id_of,
    tag_matches,
    txt_properties,
)
from .portal import ThreadPortal

__all__ = [
    "AddressTable", "DiscoveryError", "GroupTags", "MdnsDiscovery", "PeerGone", "PeerSeen", "SERVICE_TYPE",
    "ThreadPortal", "instance_label", "label_site", "site_id_of", "tag_matches", "txt_properties",
]
