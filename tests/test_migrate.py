"""An output of the earlier layout (JSON manifests) is refused with the way out, and `migrate` converts it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ExitCode
from pipeline.io.delta import embeddings_of, open_table
from pipeline.io.units import read_units
from pipeline.migrate import MIGRATED, migrate

REPO = Path(__file__).resolve().parents[1]


def _earlier_output(root: Path) -> Path:
    """Two units as the manifest layout wrote them: band files named by unit, fp16 fixed-size embeddings."""
    output = root / "scores"
    for unit, scores in (("u1", [5.5, 6.7]), ("u2", [4.0])):
        files = []
        for band, chosen in (("5-6", [s for s in scores if 5 <= s < 6]), ("ge6.5", [s for s in scores if s >= 6.5]),
                             ("lt4.5", [s for s in scores if s < 4.5])):
            if not chosen:
                continue
            embedding = np.full((len(chosen), 4), 0.5, dtype=np.float16)
            table = pa.table({"key": [f"{unit}-{s}" for s in chosen], "unit": [unit] * len(chosen),
                              "aesthetic_score": pa.array(chosen, pa.float32()),
                              "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), 4)})
            path = f"score_band={band}/{unit}.parquet"
            (output / path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, output / path)
            files.append({"path": path, "band": band, "rows": len(chosen)})
        manifest = {"format": 1, "unit": unit, "run_id": "old", "rows": len(scores), "files": files,
                    "model_key": "tiny-random/seed=0|h@abc", "counts_by_status": {"ok": len(scores)},
                    "score": {"scored": len(scores), "counts_ge": {}}, "shards": [{"name": f"{unit}.tar"}]}
        (output / "_manifests").mkdir(parents=True, exist_ok=True)
        (output / "_manifests" / f"{unit}.json").write_text(json.dumps(manifest))
    return output


def test_an_earlier_output_is_refused_with_the_command_that_converts_it(tmp_path):
    output = _earlier_output(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "cutoffs", str(output)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.INPUT
    assert result.stderr.strip() == (f"aesthetics: {output} holds scores in the earlier layout (one JSON manifest "
                                     f"per unit under _manifests/), not Delta tables; convert it once with "
                                     f"`aesthetics migrate {output}`")


def test_migrate_makes_each_unit_a_delta_commit_and_leaves_nothing_of_the_old_layout(tmp_path):
    output = _earlier_output(tmp_path)
    result = migrate(str(output))
    assert (result.units, result.rows, result.skipped) == (2, 3, 0)

    table = open_table(str(output)).to_pyarrow_table()
    assert sorted(table["key"].to_pylist()) == ["u1-5.5", "u1-6.7", "u2-4.0"]
    assert np.array_equal(embeddings_of(table["embedding"]), np.full((3, 4), 0.5, dtype=np.float32))
    records = read_units(str(output))
    assert {unit: record["rows"] for unit, record in records.items()} == {"u1": 2, "u2": 1}
    assert not (output / "_manifests").exists() and (output / MIGRATED / "u1.json").exists()
    assert sorted(p.name for p in output.glob("score_band=*/*.parquet")) == ["u1.v1.parquet", "u1.v1.parquet",
                                                                          "u2.v1.parquet"]
