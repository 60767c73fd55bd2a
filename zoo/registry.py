"""Discovery of the zoo's tasks: configs/<task>/*.yaml and the datamodule each names."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def data_formats(cls) -> str:
    """The datamodule docstring's first paragraph: what data it reads."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].strip() or "(undocumented)"


def discover(root: Path = CONFIGS) -> list[dict]:
    """[{task, configs, data_class, formats}] for every folder of configs."""
    tasks = []
    if not root.is_dir():
        return tasks
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        configs = sorted(folder.glob("*.yaml"))
        if not configs:
            continue
        data_class, formats = "?", ""
        for cfg in configs:
            spec = yaml.safe_load(cfg.read_text()) or {}
            path = (spec.get("data") or {}).get("class_path")
            if path:
                data_class = path
                try:
                    formats = data_formats(import_class(path))
                except Exception as err:  # a broken task must not hide the others
                    formats = f"(cannot import: {err})"
                break
        tasks.append({"task": folder.name, "configs": [str(c.relative_to(root.parent)) for c in configs],
                      "data_class": data_class, "formats": formats})
    return tasks
