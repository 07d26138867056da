"""Run by tests/privacy/test_ddp.py under torchrun (or alone): a few DP-SGD steps, then save the weights.

Usage: python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT NOISE_MULTIPLIER BACKEND
(or python ddp_worker.py ... without torchrun for the one-process reference).
"""

import os
import sys

import torch
from torch import nn

from privdiff.privacy.engine import DPConfig, DPSGDEngine


def main(out: str, noise_multiplier: float, backend: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randn(40, 3)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    subjects = [str(i // 2) for i in range(40)]

    def per_sample_loss(indices):
        return (model(x[indices]) - y[indices]).pow(2).sum(dim=1)

    config = DPConfig(delta=1e-5, max_grad_norm=0.5, sample_rate=0.4, steps=6, noise_multiplier=noise_multiplier,
                      physical_batch_size=3, privacy_unit="subject", max_examples_per_subject=2, backend=backend)
    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config,
                         num_examples=40, subjects=subjects, generator=torch.Generator().manual_seed(11),
                         sampling_generator=torch.Generator().manual_seed(22))
    losses = [engine.step(per_sample_loss)["loss"] for _ in range(config.steps)]
    if not distributed or torch.distributed.get_rank() == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["losses"] = torch.tensor([float("nan") if v is None else v for v in losses])
        torch.save(state, out)
    if distributed:
        # A rank that tears down while the other still saves can abort gloo ("terminate called
        # without an active exception"): wait for both first.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # gloo can still abort at interpreter exit, destroying a thread it left joinable (1 run in 50
        # with the barrier alone): the work is saved, so leave without running C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
