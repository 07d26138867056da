"""What every privdiff trainer shares (DESIGN.md 2).

- `diffusion`: latents, denoising targets, the training scheduler, the trained modules, losses.
- `trainable`: the parameter sets a run may train (attention, LoRA, full, ...).
- `fine_tune`: the one DP-SGD fine-tune loop (DP-LDM's, and a federated client's in memory).
- `checkpoint`: the one checkpoint unit (parameters, optimizer, generators, accountant).
- `release`: releases whose files appear together, and the released weight files' names.
- `outputs`: output folders checked before work starts; where by-products live.
- `inputs`: what every trainer's `base` and `data` may be, resolved the same way.
- `result`: the one `Progress` report and the one `TrainResult` every trainer gives.

Imports flow nodes -> pipelines -> (federated, transport) -> training -> (privacy, models, data);
pyproject's import-linter contract checks it.
"""
