"""The scoring set-up every integration test shares."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import DecodeConfig, HeadSpec, ModelConfig, ResourcesConfig, ScoreConfig


@dataclass(frozen=True)
class Scoring:
    heads: tuple[HeadSpec, ...]
    weights_dirs: tuple[str, ...]

    def config(self, inputs, output: str, **changes) -> ScoreConfig:
        values = dict(
            input=tuple([inputs] if isinstance(inputs, str) else inputs), output=output,
            model=ModelConfig(name="tiny-random", precision="fp32"), heads=self.heads,
            weights_dirs=self.weights_dirs, shards_per_unit=1,
            decode=DecodeConfig(batch_size=16), resources=ResourcesConfig(embed_batch_size=16),
        )
        values.update(changes)
        return ScoreConfig(**values)


@pytest.fixture(scope="session")
def scoring(tmp_path_factory) -> Scoring:
    """The real LAION V2 head from ../shared when present, else a seeded random head in its format."""
    from pipeline.demo import v2_head_or_stand_in

    return Scoring(*v2_head_or_stand_in(tmp_path_factory.mktemp("heads")))


def rewrite_tar(source: str | Path, target: str | Path, replace: dict[str, bytes] | None = None,
                add: list[tuple[str, bytes]] | None = None) -> None:
    """Copy a tar, swapping the data of some members and appending others."""
    replace = replace or {}
    with tarfile.open(source) as original, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as copy:
        for member in original.getmembers():
            data = replace.get(member.name, original.extractfile(member).read())
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            copy.addfile(info, io.BytesIO(data))
        for name, data in add or []:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            copy.addfile(info, io.BytesIO(data))
