"""Losses for fine-tuning: the model outputs one number per image (a score, or a keep logit), and each loss
compares it with the label.

- ``mse``, ``l1``: on the score, divided by the training labels' std so the loss is unit-free and the same
  learning rate means the same on AVA's 1..10 and on a 0..1 CSV;
- ``mixed``: the mean of the L1, L2 and L3 errors (the unit-free error ``e``: ``(|e| + e^2 + |e|^3) / 3``);
- ``emd``: NIMA's r=2 earth mover's distance over 10 bins (scores 1..10). The prediction becomes a discretised
  normal centred on it with one learned spread (as ``train-head``'s EMD does); the target is the vote
  distribution where the labels have votes, else the label score spread into the bins the same way with a
  fixed spread (``EMD_TARGET_SIGMA``), so the EMD stage of a schedule also runs on ``key,score`` labels;
- ``bce``: keep/trash labels, the output is the logit of keep.

A schedule switches losses between epochs, so one :class:`Objective` computes all of them; which one is a
call argument. Its spread parameter is always trainable, and the non-EMD losses add ``0 * log_sigma`` so that
DDP sees a gradient for every parameter in every step whatever the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError
from pipeline.training.labels import AVA_VOTE_BINS, LabelKind
from pipeline.training.schedule import LOSSES
from pipeline.training.train_head import emd_loss, score_distribution

EMD_TARGET_SIGMA = 1.0  # spread of the target distribution made from a mean score (AVA's mean vote std is ~1.4)
_MIN_SIGMA = 0.05


def check_losses(losses: set[str], label_kind: str, score_range: tuple[float, float]) -> None:
    """Refuse a loss the labels cannot train: one line, before anything starts."""
    if label_kind == LabelKind.BINARY:
        wrong = sorted(losses - {"bce", "mse", "l1"})
        if wrong:
            raise ConfigError(f"keep/trash labels train with bce (or mse/l1), not {wrong}: use a schedule whose "
                              "stages all use bce")
        return
    if "bce" in losses:
        raise ConfigError("bce needs keep/trash labels; these are scores (use --keep-threshold or mse/l1/mixed/emd)")
    low, high = score_range
    if "emd" in losses and (low < 1 or high > AVA_VOTE_BINS):
        raise ConfigError(f"emd puts scores into bins 1..{AVA_VOTE_BINS}, but the labels range over "
                          f"{low:g}..{high:g}: rescale them or use a schedule without emd")


def mixed_loss(error: torch.Tensor) -> torch.Tensor:
    magnitude = error.abs()
    return ((magnitude + magnitude ** 2 + magnitude ** 3) / 3).mean()


class Objective(nn.Module):
    """Every loss of a label-unit prediction; ``label_scale`` is the training labels' std."""

    def __init__(self, label_scale: float, initial_sigma: float = 1.0):
        super().__init__()
        self.label_scale = float(label_scale) or 1.0
        self.log_sigma = nn.Parameter(torch.tensor(math.log(max(initial_sigma, _MIN_SIGMA))))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp().clamp_min(_MIN_SIGMA)

    def forward(self, loss: str, predictions: torch.Tensor, scores: torch.Tensor,
                votes: torch.Tensor | None = None) -> torch.Tensor:
        keep_in_graph = 0.0 * self.log_sigma
        if loss == "emd":
            if votes is None:
                target = score_distribution(scores, torch.tensor(EMD_TARGET_SIGMA, dtype=scores.dtype,
                                                                 device=scores.device))
            else:
                target = votes / votes.sum(dim=1, keepdim=True)
            return emd_loss(score_distribution(predictions, self.sigma), target)
        if loss == "bce":
            return F.binary_cross_entropy_with_logits(predictions, scores) + keep_in_graph
        error = (predictions - scores) / self.label_scale
        if loss == "mse":
            return (error ** 2).mean() + keep_in_graph
        if loss == "l1":
            return error.abs().mean() + keep_in_graph
        if loss == "mixed":
            return mixed_loss(error) + keep_in_graph
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
