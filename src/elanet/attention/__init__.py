"""Layer attention: MRLA-B / ELA and MRLA-L modules, the stage memory, and attention recording."""
from .aggregate import LayerMemory, aggregate
from .mrla import DropPath, MRLABase, MRLALight, eca_kernel_size
from .record import AttentionRecord, record_attention

__all__ = [
    "LayerMemory", "aggregate", "DropPath", "MRLABase", "MRLALight", "eca_kernel_size",
    "AttentionRecord", "record_attention",
]
