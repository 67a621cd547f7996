"""Backbones: CIFAR and ImageNet bottleneck ResNets, plain or with MRLA-L, MRLA-B or ELA attention."""
from .registry import create_model, list_models, model_info
from .resnet import Bottleneck, ResNet, Stage

__all__ = ["create_model", "list_models", "model_info", "Bottleneck", "ResNet", "Stage"]
