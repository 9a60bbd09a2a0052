"""ringlwm.ring: attention across the ranks of a process group (RingAttention, zigzag layout)."""

from ringlwm.ring.attention import RingAttention, RingSettings, ring_attention, ring_settings
from ringlwm.ring.comm import RingComm
from ringlwm.ring.layout import check_divisible, shard_sequence, sp_world, unshard_sequence, zigzag_positions

__all__ = [
    "RingAttention",
    "RingComm",
    "RingSettings",
    "check_divisible",
    "ring_attention",
    "ring_settings",
    "shard_sequence",
    "sp_world",
    "unshard_sequence",
    "zigzag_positions",
]
