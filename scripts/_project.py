"""How every script finds the project: ``use_project()`` puts its root on ``sys.path``."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_project() -> Path:
    """Make the project's packages (engine, models, data) importable and return its root.

    ``python scripts/NAME.py`` puts scripts/ on the path, not the project; each script calls this before
    it imports them.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return ROOT
