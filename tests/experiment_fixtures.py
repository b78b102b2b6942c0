"""Per-experiment test overrides: tiny sizes, and small fixture data where an experiment needs files."""

from __future__ import annotations

from pathlib import Path

# experiments whose data ships offline run as they are (with tiny nets); others get fixture data here
SMALL_NET = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_heads=2"]


def overrides_for(experiment: str, tmp_path: Path) -> list[str]:
    if experiment == "quickstart":
        return [*SMALL_NET, "callbacks.class_accuracy.num_per_class=1", "sampler.steps=2"]
    return []
