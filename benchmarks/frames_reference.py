"""What pushing a DataFrame cost before column batches, kept for the bench's reference:
``from_dataframe`` as it was on commit 6f33ee1 (a Python value per cell, then
``msgspec.convert`` of a list per row), without its error reporting (the bench's frames fit).
The bench times it, then ``submit_many`` and ``flush``, against ``submit_frame``: the issue's
"today's rows/s into an ordinary processor", measured in the same run."""

from __future__ import annotations

from typing import Any

import msgspec


def from_dataframe_6f33ee1(df: Any, record_type: type) -> list[Any]:
    import pandas as pd

    tag = record_type.__struct_config__.tag or record_type.__name__  # type: ignore[attr-defined]
    names = [f.name for f in msgspec.structs.fields(record_type)]
    values = [[_python_value(v, pd) for v in df[f].tolist()] for f in names]
    rows = [[tag, *row] for row in zip(*values)]
    return msgspec.convert(rows, list[record_type], strict=False)  # type: ignore[valid-type]


def _python_value(value: Any, pd: Any) -> Any:
    """A cell as a plain Python value (None for a missing one), as on 6f33ee1."""
    if value is None or isinstance(value, (str, bytes, bool, int, list, dict, msgspec.Struct)):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, pd.Timedelta):
        return value.to_pytimedelta()
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item):
        value = item()
        if isinstance(value, float) and value != value:
            return None
    return value
