"""Pure values and functions: clocks, version vectors, changes, the merge rule."""

from .change import Batch, Change, Range, Value
from .hlc import Hlc, ClockSkewError
from .merge import Clock, wins
from .version_vector import VersionVector

__all__ = ["Batch", "Change", "Range", "Value", "Hlc", "ClockSkewError", "Clock", "wins", "VersionVector"]
