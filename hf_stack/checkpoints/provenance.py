"""Stage 2, provenance: the contents of `growth_config.json`, written beside every grown model."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..operators import get_operator
from ..plans.config import GROWTH_CONFIG_NAME, StackedConfig
from ..plans.plan import GrowthPlan
from .source import SourceCheckpoint


def source_info(source: SourceCheckpoint, num_layers: int) -> dict:
    """Where a growth started from, for `growth_config.json`."""
    return {
        "name_or_path": source.name_or_path,
        "revision": source.revision,
        "commit": source.commit,
        "architecture": source.config["architectures"][0],
        "num_layers": num_layers,
    }


def growth_record(plan: GrowthPlan, stacked: StackedConfig, source: dict, learned: dict | None = None) -> dict:
    """The contents of `growth_config.json`: the settings, the plan and where the source came from."""
    record = {
        "hf_stack_version": __version__,
        "settings": stacked.to_dict(),
        "paper": get_operator(plan.operator).paper,
        "source": source,
        **plan.to_dict(),
    }
    if learned is not None:
        record["learn"] = learned
    return record


def write_growth_record(folder: Path, record: dict) -> None:
    (Path(folder) / GROWTH_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
