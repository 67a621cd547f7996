"""Object detection with ELA backbones: torchvision Faster / Mask R-CNN, COCO-format data, COCO evaluation.

Example::

    import elanet
    model = elanet.create_detector("mask_rcnn", backbone="resnet50_ela", num_classes=81)
"""
from .coco import CocoDetection, DetectionLoader, coco_paths, collate, read_coco_json
from .detectors import DETECTORS, ELABackboneWithFPN, GroupNorm32, backbone_names, create_detector, freeze_stages, stage_prefixes
from .evaluate import STATS, coco_evaluate, evaluate_detector, load_coco_gt, predict, to_coco_results
from .synthetic import default_cache_dir, make_synthetic_coco

__all__ = [
    "CocoDetection", "DetectionLoader", "coco_paths", "collate", "read_coco_json", "DETECTORS", "ELABackboneWithFPN",
    "GroupNorm32", "backbone_names", "create_detector", "freeze_stages", "stage_prefixes", "STATS", "coco_evaluate",
    "evaluate_detector", "load_coco_gt", "predict", "to_coco_results", "default_cache_dir", "make_synthetic_coco",
]
