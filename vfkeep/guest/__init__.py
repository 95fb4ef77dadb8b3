"""Guest side of the model: channel rings (DESIGN §7) and traffic frames/statistics."""
from .ring import (BadRingHeader, ChannelLayout, Doorbell, NicChannel, Ring, RingCorrupt, RingError, RingStats,
                   ring_size)
from .stats import (BadFrame, DeliveryBin, FrameRecord, TrafficFrame, TrafficStats, blackout, make_frame,
                    parse_frame, windowed_delivery)

__all__ = ["BadRingHeader", "ChannelLayout", "Doorbell", "NicChannel", "Ring", "RingCorrupt", "RingError",
           "RingStats", "ring_size", "BadFrame", "DeliveryBin", "FrameRecord", "TrafficFrame", "TrafficStats",
           "blackout", "make_frame", "parse_frame", "windowed_delivery"]
