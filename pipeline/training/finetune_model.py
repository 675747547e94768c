"""The model :mod:`pipeline.training.finetune` trains: the image tower, the head and every loss in one module, so
DDP synchronises all of their parameters. Its own module because it needs torch at import, which the Ray Data
tasks that import ``finetune`` for its row functions do not."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError
from pipeline.training.losses import Objective
from pipeline.training.train_head import TrainConfig, build_head_module, export_state_dict


class AestheticModel(nn.Module):
    """uint8 NHWC pixels -> score in label units (see :mod:`pipeline.training.finetune`)."""

    def __init__(self, visual: nn.Module, config: Any, embed_dim: int, mean: Sequence[float],
                 std: Sequence[float], output_mean: float, output_scale: float, initial_sigma: float):
        super().__init__()
        self.visual = visual
        head_config = TrainConfig(arch=config.arch, hidden=config.hidden, dropout=config.dropout)
        self.head = build_head_module(head_config, embed_dim)
        self.objective = Objective(output_scale, initial_sigma)
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        # The scoring job's normalisation, the same ops in the same order (pipeline.stages.embed).
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", (mean_t / std_t).view(1, 3, 1, 1), persistent=False)
        self.embed_dim = embed_dim
        self.input_gain = math.sqrt(embed_dim)
        self.output_mean = float(output_mean)
        self.output_scale = float(output_scale)

    def set_trainable(self, blocks: int | None) -> None:
        self.visual.requires_grad_(blocks is None)
        if blocks:
            resblocks = getattr(getattr(self.visual, "transformer", None), "resblocks", None)
            if resblocks is None:
                raise ConfigError("trainable_blocks needs a ViT image tower; train the whole tower instead")
            if blocks > len(resblocks):
                raise ConfigError(f"trainable_blocks={blocks}, but the tower has {len(resblocks)} blocks")
            for block in list(resblocks)[-blocks:]:
                block.requires_grad_(True)
            for name in ("ln_post", "proj"):
                part = getattr(self.visual, name, None)
                if isinstance(part, nn.Module):
                    part.requires_grad_(True)
                elif isinstance(part, nn.Parameter):
                    part.requires_grad_(True)
        self.head.requires_grad_(True)
        self.objective.requires_grad_(True)

    def normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).float().mul_(self.pixel_scale).sub_(self.pixel_shift)

    def predict_normalised(self, images: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(self.visual(images).float(), dim=-1)
        return self.head(unit * self.input_gain)[:, 0] * self.output_scale + self.output_mean

    def forward(self, images: torch.Tensor, loss: str, scores: torch.Tensor,
                votes: torch.Tensor | None = None) -> torch.Tensor:
        return self.objective(loss, self.predict_normalised(images), scores, votes)

    def export_head(self) -> dict[str, torch.Tensor]:
        dim = self.embed_dim
        return export_state_dict(self.head, torch.zeros(dim), torch.full((dim,), 1.0 / self.input_gain),
                                 self.output_mean, self.output_scale)
