"""Shared pytest fixtures: repository paths, and a Hypothesis profile that suits CI."""

from pathlib import Path

import pytest
from hypothesis import settings

# No deadline: the first example of a test pays for imports and torch warm-up on a 2-core machine.
settings.register_profile("ci", deadline=None, max_examples=50)
settings.load_profile("ci")

_REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the directory holding setup.cfg)."""
    return _REPO_ROOT


@pytest.fixture(scope="session")
def conf_dir(repo_root: Path) -> Path:
    """The Hydra config directory, for `initialize_config_dir(config_dir=str(conf_dir))`."""
    return repo_root / "conf"
