"""Capture: the training step as one joint ATen graph (trace), and its AOTAutograd forward/backward split (aot)."""

from memopt.capture.trace import CapturedStep, InputRole, Placeholder, capture

__all__ = ["CapturedStep", "InputRole", "Placeholder", "capture"]
