"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform

import jax


def device_description() -> str:
    """One line naming the device the benchmark ran on (recorded with every figure)."""
    return (f"{jax.devices()[0].device_kind} x1 ({jax.default_backend()}), "
            f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")


def write_json(path: str, summary: dict) -> None:
    """Writes `summary` to `path` (creating folders) and says where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
