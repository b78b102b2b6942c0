"""Run by tests/test_meanflow.py: the meanflow loss under DDP (gloo, 2 CPU processes), gradients synced or not."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from diffusion_lab.diffusion import (
    LossInputs,
    get_loss_weighting,
    get_noise_levels,
    get_objective,
    get_process,
)
from diffusion_lab.nets.unet import UNet


class Step(torch.nn.Module):
    """A system-like module: its forward is the meanflow training loss of its two-time UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = UNet(
            in_channels=1,
            base_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_heads=2,
            norm_groups=4,
            two_time=True,
        )
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.net.parameters():
                if p.abs().sum() == 0:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))

    def forward(self, rank):
        x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + rank))
        return get_objective("meanflow").loss(
            LossInputs(
                net=self.net,
                x0=x0,
                process=get_process("rectified_flow"),
                noise_levels=get_noise_levels("logit_normal"),
                weighting=get_loss_weighting("uniform"),
                generator=torch.Generator().manual_seed(rank),
            )
        )


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def run(rank, world, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DistributedDataParallel(Step())
    model(rank).backward()  # through DDP's forward: the reducer all-reduces the gradients in backward
    synced = grads(model.module)
    model.zero_grad(set_to_none=True)
    model.module(rank).backward()  # the pitfall: the wrapped module called directly, no sync
    torch.save({"synced": synced, "bypass": grads(model.module)}, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(run, args=(2, out, port), nprocs=2)
    torch.set_num_threads(1)
    local = []
    for rank in range(2):
        m = Step()
        m(rank).backward()
        local.append(grads(m))
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    mean = (local[0] + local[1]) / 2
    err = max(float((r["synced"] - mean).abs().max()) for r in res) / float(mean.abs().max())
    gap = float((local[0] - local[1]).abs().max()) / float(mean.abs().max())
    bypass_local = max(float((r["bypass"] - local[i]).abs().max()) for i, r in enumerate(res))
    print(
        f"synced_vs_mean_rel={err:.3e} ranks_differ_rel={gap:.3e} bypass_equals_local_abs={bypass_local:.3e}"
    )
