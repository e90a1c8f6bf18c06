"""Every YAML in configs/ builds what it names, so no config rots."""

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from datamodules.caption_image import CaptionImageDataModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
# the type each top-level section of a config must build; a new kind of section needs an entry here
SECTION_TYPES = {"data": CaptionImageDataModule}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_builds_its_sections(path):
    sections = yaml.safe_load(path.read_text())
    assert set(sections) <= set(SECTION_TYPES), f"{path} has sections no test builds: {set(sections) - set(SECTION_TYPES)}"
    parser = ArgumentParser()
    for name in sections:
        parser.add_argument(f"--{name}", type=SECTION_TYPES[name])
    config = parser.instantiate(parser.parse_path(path))
    for name, expected_type in SECTION_TYPES.items():
        if name in sections:
            assert isinstance(config[name], expected_type)
