"""Backbones: torchvision-based ResNets (with a 32x32 stem), a small CNN for tiny images, and a classifier wrapper."""

from dreamood.models.classifier import Classifier
from dreamood.models.resnet import ResNetFeatures, resnet18, resnet34, resnet50
from dreamood.models.small import SmallConvNet

__all__ = ["Classifier", "ResNetFeatures", "SmallConvNet", "resnet18", "resnet34", "resnet50"]
