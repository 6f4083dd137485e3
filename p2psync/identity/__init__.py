"""Who a device is (its home and keys), the key schedule, and invite codes."""

from .home import (DEVICE_FILE, KEYS_FILE, Device, DeviceKeys, IdentityError, check_name, create_device,
                   load_device, refuse_existing, resolve_home)
from .invites import INVITE_PREFIX, InviteCode, InviteError, encode_invite, parse_duration, parse_invite
from .keys import BoxError, EpochKeys


def day_number(unix_time: float) -> int:
    """The UTC day number of ``unix_time``, as ``EpochKeys.mdns_tag`` expects."""
    return int(unix_time // 86400)


__all__ = ["DEVICE_FILE", "KEYS_FILE", "Device", "DeviceKeys", "IdentityError", "check_name", "create_device",
           "load_device", "refuse_existing", "resolve_home", "INVITE_PREFIX", "InviteCode", "InviteError",
           "encode_invite", "parse_duration", "parse_invite", "BoxError", "EpochKeys", "day_number"]
