"""Pictures of what ELA did: attention heatmaps, pruning charts, Score-CAM maps and speed plots.

Every figure is drawn on matplotlib's Agg canvas (no display) at a fixed size and written as PNG or
SVG. The trainer calls :func:`draw_pruning` after each pruning round and :func:`draw_attention` at
the end of a run; ``elanet viz`` draws the same pictures from a run folder or checkpoint.
"""
from .attention import StageAttention, adjacent_block_kl, draw_attention, mean_attention, plot_attention
from .figure import DPI, FORMATS, save_figure
from .pruning import draw_pruning, mask_history, plot_pruning
from .scorecam import CamResult, attention_blocks, default_blocks, draw_scorecam, plot_scorecam, score_cam
from .speed import draw_speed, plot_speed, read_bench

__all__ = [
    "StageAttention", "adjacent_block_kl", "draw_attention", "mean_attention", "plot_attention",
    "DPI", "FORMATS", "save_figure", "draw_pruning", "mask_history", "plot_pruning",
    "CamResult", "attention_blocks", "default_blocks", "draw_scorecam", "plot_scorecam", "score_cam",
    "draw_speed", "plot_speed", "read_bench",
]
