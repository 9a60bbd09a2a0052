"""ringlwm.ring: attention across the ranks of a process group (RingAttention, zigzag layout; Ulysses x ring)."""

from ringlwm.ring.attention import RingAttention, RingSettings, ring_attention, ring_settings
from ringlwm.ring.comm import RingComm
from ringlwm.ring.layout import (
    check_divisible,
    check_layout,
    shard_sequence,
    sp_world,
    unshard_sequence,
    zigzag_positions,
)
from ringlwm.ring.ulysses import check_ulysses_heads, sequence_group

__all__ = [
    "RingAttention",
    "RingComm",
    "RingSettings",
    "check_divisible",
    "check_layout",
    "check_ulysses_heads",
    "ring_attention",
    "ring_settings",
    "sequence_group",
    "shard_sequence",
    "sp_world",
    "unshard_sequence",
    "zigzag_positions",
]
