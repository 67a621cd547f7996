"""ELA pruning: KL redundancy, EBQM, the mask and the staged schedule."""
from .ebqm import MAPPINGS, check_ebqm_args, ebqm, map_scores
from .kl import adjacent_kl
from .mask import ela_blocks, get_mask, set_mask
from .schedule import PRESETS, PruningSchedule, format_round

__all__ = [
    "MAPPINGS", "check_ebqm_args", "ebqm", "map_scores", "adjacent_kl", "ela_blocks", "get_mask", "set_mask",
    "PRESETS", "PruningSchedule", "format_round",
]
