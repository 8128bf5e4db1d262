"""Loggers of tracked rows: JSONL (always), TensorBoard, MLflow, Weights & Biases (each optional)."""

from .base import Logger
from .jsonl import JsonlLogger, read_rows, read_tracking, read_tracking_layers

__all__ = ["Logger", "JsonlLogger", "read_rows", "read_tracking", "read_tracking_layers"]
