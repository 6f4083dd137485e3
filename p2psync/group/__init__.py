"""The group as a device or relay knows it: membership log, keys, and the events a device signs."""

from .actions import ActionError
from .members import Admission, GroupMembers

__all__ = ["ActionError", "Admission", "GroupMembers"]
