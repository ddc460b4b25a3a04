"""Evaluation: data readers, the metric registry and the resumable runner."""
