"""Model construction and loading: tiny seeded components, offline loaders, layout conversion.

Submodules import torch/diffusers; this file does not, so `import privdiff` stays light.
"""
