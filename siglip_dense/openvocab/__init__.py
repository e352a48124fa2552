"""Open-vocabulary segmentation: class names given at inference time, scored with the SigLIP text tower."""

from siglip_dense.openvocab.benchmarks import benchmark_classes
from siglip_dense.openvocab.zeroshot import METHODS, ZeroShotSegmenter, load_model

__all__ = ["METHODS", "ZeroShotSegmenter", "benchmark_classes", "load_model"]
