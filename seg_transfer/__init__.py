"""seg_transfer: ImageNet encoders in U-Nets, staged fine-tuning, measured against scratch."""

__version__ = "0.1.0"
