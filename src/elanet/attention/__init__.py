"""Attention: MRLA-B / ELA and MRLA-L, the Table 1-2 baselines, the stage memory, the per-forward state
mechanism (``context``) and attention recording."""
from .aggregate import LayerMemory, aggregate
from .context import AttentionParts, Relay, StageContext
from .mrla import DropPath, MRLABase, MRLALight, eca_kernel_size
from .record import AttentionRecord, record_attention

__all__ = [
    "LayerMemory", "aggregate", "AttentionParts", "Relay", "StageContext", "DropPath", "MRLABase", "MRLALight",
    "eca_kernel_size", "AttentionRecord", "record_attention",
]
