"""Arrow tables as the numpy batches Ray Data hands a ``batch_format="numpy"`` UDF, without importing Ray:
the plain-loop benchmarks and bench/gpu_check.py (which runs where Ray is not installed) feed the stages
exactly what the job's Ray Data pipeline would."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow table as the numpy column batch Ray Data hands a ``batch_format="numpy"`` UDF."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        values = column.to_numpy(zero_copy_only=False)
        if (pa.types.is_string(column.type) or pa.types.is_binary(column.type)) and values.dtype != object:
            values = values.astype(object)
        out[name] = values
    return out
