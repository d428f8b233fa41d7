"""Where the shipped configs, recipes and sample data live: inside the wheel, or beside the package in a checkout."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name_in_wheel: str, name_in_repo: str) -> Path:
    # The wheel force-includes conf/, recipes/ and data/ into the package (pyproject.toml);
    # an editable install or a plain checkout reads them from the repository root.
    inside = PACKAGE_DIR / name_in_wheel
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name_in_repo


CONF_DIR = _shipped("conf", "conf")
RECIPES_DIR = _shipped("recipes", "recipes")
SAMPLE_DATA_DIR = _shipped("sample_data", "data")
ASSETS_DIR = PACKAGE_DIR / "assets"
