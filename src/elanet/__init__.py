"""elanet: Efficient Layer Attention (ELA) — layer attention for CNNs that prunes redundant retrievals.

Quick start::

    import elanet
    model = elanet.create_model("resnet56_ela", num_classes=100)
    with elanet.record_attention(model) as rec:
        model(images)
    schedule = elanet.PruningSchedule.preset("cifar")
"""
from .attention import AttentionRecord, MRLABase, MRLALight, record_attention
from .models import create_model, list_models, load_pretrained, model_info
from .profile import Profile, count_params, profile
from .pruning import PRESETS, PruningSchedule, adjacent_kl, ebqm, format_round, get_mask, map_scores, set_mask

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord", "MRLABase", "MRLALight", "record_attention", "create_model", "list_models", "load_pretrained", "model_info",
    "Profile", "count_params", "profile", "PRESETS", "PruningSchedule", "adjacent_kl", "ebqm", "format_round",
    "get_mask", "map_scores", "set_mask", "__version__",
]
