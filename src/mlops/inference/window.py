"""Sliding-window inference over one preprocessed case, with nnU-Net's tiles and weights but fewer, larger passes.

nnU-Net runs every tile and each of its mirrored copies as its own batch-1 forward pass and accumulates in fp16. Here
the mirrored copies of several tiles go through the network as one batch, and logits accumulate in fp32. The tile
positions, the padding and the Gaussian importance map are nnU-Net's own (from :mod:`mlops.nnunet`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from mlops import nnunet
from mlops.errors import Cancelled

Runner = Callable[[torch.Tensor], torch.Tensor]  # (n, c, *patch) float32 -> (n, k, *patch) float32 logits


def mirror_combinations(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The identity, then each non-empty combination of mirrored axes, in nnU-Net's order (axes of a 5D batch)."""
    axes = [a + 2 for a in mirror_axes]
    return [(), *(c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1))]


def sliding_window_logits(
    data: torch.Tensor,
    runners: list[Runner],
    patch_size: tuple[int, ...],
    num_classes: int,
    tile_step_size: float,
    mirror_axes: tuple[int, ...] | None,
    max_batch: int,
    device: torch.device,
    cancel: Callable[[], bool] | None = None,
    members: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (k, z, y, x) of ``data`` (c, z, y, x): the mean over ``runners`` (folds) of the Gaussian-weighted,
    mirror-averaged tile predictions. ``max_batch`` bounds the tiles x mirrors of one forward pass (the activations of
    every item of a pass are held at once: on the CPU they, not the speed, grow with the batch).

    ``members``: when a list is given, the argmax labels (z, y, x, uint8) of each ensemble member are appended to it,
    for the disagreement signal of :mod:`mlops.monitoring`: one per fold with several folds, else one per mirrored
    pass (which then costs one extra logit buffer per mirror). ``None`` (the default) leaves this path untouched.
    """
    data = data.to(device=device, dtype=torch.float32)
    padded, revert = nnunet.pad_to_patch(data, patch_size)
    shape = tuple(padded.shape[1:])
    starts = nnunet.tile_starts(shape, patch_size, tile_step_size)
    tiles = [
        tuple(slice(s, s + p) for s, p in zip(corner, patch_size, strict=True)) for corner in itertools.product(*starts)
    ]
    combos = mirror_combinations(mirror_axes or ())
    per_pass = max(1, max_batch // len(combos))
    gaussian = nnunet.gaussian_weights(patch_size, device)
    weights = torch.zeros(shape, dtype=torch.float32, device=device)
    for sl in tiles:
        weights[sl] += gaussian
    total = torch.zeros((num_classes, *shape), dtype=torch.float32, device=device)
    per_mirror = members is not None and len(runners) == 1 and len(combos) > 1
    mirrored = [torch.zeros_like(total) for _ in combos] if per_mirror else []
    for run in runners:
        logits = torch.zeros_like(total)
        for first in range(0, len(tiles), per_pass):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            chunk = tiles[first : first + per_pass]
            patches = [padded[(slice(None), *sl)] for sl in chunk]
            batch = torch.stack(
                [torch.flip(p, [a - 1 for a in axes]) if axes else p for p in patches for axes in combos]
            )
            # A forward pass holds its activations for every item: at most max_batch items per pass bounds memory.
            out = torch.cat([run(batch[i : i + max_batch]) for i in range(0, len(batch), max_batch)])
            for t, sl in enumerate(chunk):
                group = out[t * len(combos) : (t + 1) * len(combos)]
                pred = group[0].clone()
                for m, axes in enumerate(combos[1:], start=1):
                    pred += _flip(group[m], axes)
                pred /= len(combos)
                logits[(slice(None), *sl)] += pred * gaussian
                for m, axes in enumerate(combos if per_mirror else ()):
                    mirrored[m][(slice(None), *sl)] += _flip(group[m], axes) * gaussian
        total += logits / weights
        if members is not None and len(runners) > 1:
            members.append(_labels(logits[(slice(None), *revert[1:])]))
    if len(runners) > 1:
        total /= len(runners)
    for buffer in mirrored:  # the weights divide every voxel by a positive number: the argmax needs no division
        members.append(_labels(buffer[(slice(None), *revert[1:])]))  # type: ignore[union-attr]
    return total[(slice(None), *revert[1:])]


def _labels(logits: torch.Tensor) -> torch.Tensor:
    """Argmax labels (z, y, x) as uint8 on the CPU: small enough to keep one per ensemble member."""
    return logits.argmax(0).to(torch.uint8).cpu()


def _flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Mirror one (c, z, y, x) item along ``axes`` given for the 5D batch (hence the shift by one)."""
    return torch.flip(x, [a - 1 for a in axes]) if axes else x
