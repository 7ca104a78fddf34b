"""What the loop must do when it runs under torch.distributed (one process per DDP worker).

DDP keeps weights and gradients equal across ranks, but two things it does not cover are ours:
masks must be identical everywhere (we broadcast rank 0's and verify a checksum), and BatchNorm
running statistics drift apart after the last forward pass (each rank updates them from its own
batch), so they are synchronised from rank 0 before evaluating or saving. Outside
torch.distributed every function here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dg2pf_core.algorithm.masks import Masks, masks_checksum


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


class MaskMismatchError(RuntimeError):
    pass


@torch.no_grad()
def sync_masks(masks: Masks) -> Masks:
    """Make every rank use rank 0's masks, then verify by checksum that they now agree."""
    if not active():
        return masks
    for name in sorted(masks):
        as_bytes = masks[name].to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        masks[name] = as_bytes.bool()
    checksums = [None] * world_size()
    dist.all_gather_object(checksums, masks_checksum(masks))
    if len(set(checksums)) != 1:
        raise MaskMismatchError(f"pruning masks differ across ranks after broadcast: checksums {checksums}")
    return masks


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()
