"""The run records under docs/runs/: each one's command composes the config its run trained with."""
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from engine.tensorboard import flatten
from tests.helpers import compose_config

RECORDS = sorted((Path(__file__).resolve().parents[1] / "docs" / "runs").rglob("record.json"))
RUN_ONLY = ("hydra.",)  # where the run wrote its outputs: not part of what it trained


def test_there_are_records_to_check():
    """The check below is not vacuous."""
    assert len(RECORDS) >= 4


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_a_records_command_composes_the_config_its_run_saved(record: Path):
    """A renamed recipe or a changed default would make the record's command train something else than what
    the record reports: every key the run saved must compose, from the record's overrides, to the same value.
    Keys added to the schema after the run are absent from its config.yaml and not compared."""
    overrides = [o for o in json.loads(record.read_text())["overrides"] if not o.startswith(RUN_ONLY)]
    composed = flatten(OmegaConf.to_container(compose_config(*overrides), resolve=True))
    saved = flatten(yaml.safe_load((record.parent / "config.yaml").read_text()))
    differ = {key: (value, composed.get(key, "absent now")) for key, value in saved.items()
              if composed.get(key, "absent now") != value}
    assert not differ, f"{record.parent}: saved vs composed now: {differ}"
