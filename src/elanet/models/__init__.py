"""Backbones: CIFAR and ImageNet ResNets, plain or with one attention variant (MRLA, ELA or a Table 1-2 baseline)."""
from .registry import create_model, list_models, list_variants, model_info
from .resnet import BasicBlock, Bottleneck, ResNet, Stage

__all__ = ["create_model", "list_models", "list_variants", "model_info", "BasicBlock", "Bottleneck", "ResNet", "Stage"]
