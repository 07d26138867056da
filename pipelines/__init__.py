"""Trainers and DiffusionPipeline subclasses, one module per method, plus the demo."""
