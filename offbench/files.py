"""File helpers shared by every writer of results, tables and manifests: a reader (a resumed grid,
a table, a person) never sees half a file, because each is written beside its place and renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps_kwargs) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
