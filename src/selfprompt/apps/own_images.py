"""Training on one's own image folder without a recipe: the method's recipe for a small dataset, with the
splits the folder holds (:mod:`selfprompt.data.own_folder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfprompt.data.own_folder import find_splits
from selfprompt.data.vtab_mini import RECIPES as SMALL_DATA_RECIPES
from selfprompt.safe_yaml import load_yaml

OVERLAY = Path(__file__).parent / "recipes" / "own_images.yaml"
PHOTO_BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # what the run's first line suggests for photos


def _read(path: Path) -> dict[str, Any]:
    return load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}


def own_recipe(root: str | Path, method: str) -> tuple[dict[str, Any], str]:
    """The recipe of ``method`` for the image folder ``root`` and which splits it found there.

    Layers, later winning: the method's VTAB-mini recipe (a small dataset on the zoo backbone), the
    own-images file (``apps/recipes/own_images.yaml``: an offline backbone, the folder layout), then the
    splits found in ``root``, stage ``both`` when it has a test split (else ``tune``) and the output folder
    ``runs/<folder>-<method>``.

    Raises:
        FileNotFoundError, ValueError: ``root`` is not such a folder (:func:`find_splits`).
    """
    found = find_splits(root)
    recipe = _read(SMALL_DATA_RECIPES / f"{method.replace('-', '_')}.yaml")
    for section, values in _read(OVERLAY).items():
        recipe[section] = {**recipe.get(section, {}), **values}
    recipe["data"] |= {"root": str(root), **found.data_settings()}
    recipe["stage"] = "both" if found.test else "tune"
    recipe["output_dir"] = f"runs/{found.root.resolve().name}-{method}"
    return recipe, found.describe()
