"""Experiment plumbing: configs, atomic result files, resumable result stores."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def _atomic(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp" + os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    """Write JSON so a reader never sees a partial file (temp file + rename)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    _atomic(path, write)


def save_figure_atomic(fig, path: str, **kwargs) -> None:
    """``fig.savefig`` through a temp file + rename, then close the (pyplot) figure."""
    import matplotlib.pyplot as plt  # only experiments that plot pay for the import

    _atomic(path, lambda tmp: fig.savefig(tmp, **kwargs))
    plt.close(fig)


def load_config(path: str) -> dict:
    """A JSON experiment config; its ``name`` defaults to the file's stem."""
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return cfg


class ResultStore:
    """A JSON dict on disk that is rewritten atomically after every new entry, so a run that is
    interrupted resumes where it stopped: ``store.get_or_compute(key, fn)`` only calls ``fn`` for
    keys not already saved. Values must be JSON-serialisable."""

    def __init__(self, path: str, meta: dict | None = None):
        self.path = path
        self.data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        if meta is not None:
            if self.data.get("meta", meta) != meta:
                self.data = {}  # a different configuration: start over rather than mix results
            self.data["meta"] = meta
        self.data.setdefault("entries", {})

    def __contains__(self, key: str) -> bool:
        return key in self.data["entries"]

    def __getitem__(self, key: str):
        return self.data["entries"][key]

    def put(self, key: str, value) -> None:
        self.data["entries"][key] = value
        write_json_atomic(self.data, self.path)

    def get_or_compute(self, key: str, fn: Callable[[], Any]):
        if key not in self:
            self.put(key, fn())
        return self[key]

    @property
    def entries(self) -> dict:
        return self.data["entries"]
