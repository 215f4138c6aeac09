"""The shipped recipes parse through the real CLI exactly as ``selfprompt train RECIPE ...`` does.

Nothing here builds a model or touches the network: the recipes are only parsed and checked.
"""

import re
from pathlib import Path

from selfprompt.build import init_method
from selfprompt.cli import _normalise_argv, build_parser, check_field_names, train_config
from selfprompt.config import TrainConfig
from selfprompt.data import registry

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ALL = sorted(p for benchmark in ("vtab", "fgvc") for p in (RECIPES / benchmark).glob("**/*.yaml"))
BENCHMARKS = ("vtab", "fgvc")
BACKBONES = {
    "mae": "vit_base_patch16_224.mae",
    "moco": "vit_base_patch16_224",
    "sup_in21k": "vit_base_patch16_224.augreg_in21k",
}
METHODS = ("linear", "full", "vpt_shallow", "vpt_deep", "spt_shallow", "spt_deep")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def parse(recipe: Path, *overrides: str) -> TrainConfig:
    """What ``selfprompt train RECIPE --data.root ... --output_dir ... OVERRIDES`` resolves to (cli.main)."""
    argv = ["train", str(recipe), "--data.root", "/data/task", "--output_dir", "/runs/task", *overrides]
    argv = _normalise_argv(argv)
    parser = build_parser()
    try:
        check_field_names(parser._subcommands_action._name_parser_map["train"], argv[1:])
        ns = parser.parse_args(argv)
    except SystemExit as error:  # jsonargparse reports errors by exiting
        pytest.fail(f"{recipe.relative_to(REPO)} does not parse (exit {error.code}); see stderr")
    assert ns.command == "train"
    return train_config(ns["train"])


def test_every_recipe_is_there():
    expected = {f"{b}/{bb}/{m}.yaml" for b in BENCHMARKS for bb in BACKBONES for m in METHODS}
    assert {p.relative_to(RECIPES).as_posix() for p in ALL} == expected


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe(recipe: Path):
    benchmark, backbone, name = recipe.relative_to(RECIPES).with_suffix("").parts
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe starts with its comment block"
    assert f"selfprompt train recipes/{benchmark}/{backbone}/{name}.yaml --data.root" in text
    cfg = parse(recipe)
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert (d.root, cfg.output_dir) == ("/data/task", "/runs/task")

    assert m.method == name.replace("_", "-")
    assert m.backbone == BACKBONES[backbone]
    if backbone == "mae":
        assert (m.pool, m.head_init_std) == ("mae", 0.02)
    elif backbone == "moco":
        assert (m.pool, m.head_init_std, m.checkpoint) == ("token", 0.01, "moco_v3_checkpoint_required.pth")
        assert (d.mean, d.std) == IMAGENET
    else:
        assert (m.pool, m.head_init_std) == ("token", 0.02)
        assert (d.mean, d.std) == (None, None)  # the backbone's own 0.5/0.5 (see the recipe's comment)

    if name.endswith("deep"):
        assert m.num_prompts == 20
    elif name.endswith("shallow"):
        assert m.num_prompts == 100
    else:
        assert m.num_prompts is None
    assert m.prompt_dropout == (0.1 if name == "vpt_deep" else 0.0)
    assert m.drop_path == (0.1 if name == "full" else 0.0)
    expected_init = {"spt": "sample", "vpt": "xavier"}.get(name.split("_")[0])
    assert init_method(m) == expected_init
    if name.startswith("spt"):
        assert m.init == "sample"

    assert d.layout == "list"
    splits = (d.train_split, d.val_split, d.trainval_split, d.test_split)
    task = re.search(r"--data\.task (\w+)", text)[1]
    assert task in registry.tasks(d.benchmark)
    if benchmark == "vtab":
        assert d.benchmark == "vtab-1k"
        assert splits == registry.VTAB_SPLITS
        assert (d.augment, d.crop_pct) == ("none", 1.0)
    else:
        assert d.benchmark == "fgvc"
        assert splits == registry.tasks("fgvc")["cub"].splits
        assert (d.augment, d.crop_pct) == ("crop-flip", 0.875)

    assert (d.batch_size, o.epochs, o.warmup_epochs, o.min_lr) == (32, 100, 10, 1e-8)
    assert all(isinstance(v, float) for v in (o.lr, o.weight_decay, o.head_weight_decay, o.min_lr))
    if name.endswith("deep"):
        deep = (1e-3, 1e-2, 3.0) if backbone == "sup_in21k" else (5e-2, 1e-2, 0.5)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == deep
    elif name.endswith("shallow"):
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (1e-5, 0.05, 1.0)


def test_override_beats_recipe():
    recipe = RECIPES / "vtab" / "mae" / "spt_deep.yaml"
    assert parse(recipe).optim.lr == 5e-2
    assert parse(recipe, "--optim.lr", "0.123").optim.lr == 0.123


def test_documented_normalisation_override():
    """The override the supervised recipes document gives the official ImageNet mean/std."""
    recipe = RECIPES / "fgvc" / "sup_in21k" / "spt_deep.yaml"
    cfg = parse(recipe, "--data.mean", "[0.485,0.456,0.406]", "--data.std", "[0.229,0.224,0.225]")
    assert (cfg.data.mean, cfg.data.std) == IMAGENET


def test_unknown_recipe_field_is_refused(tmp_path):
    """The check the recipes pass is not vacuous: a misspelt field stops the parse."""
    recipe = tmp_path / "typo.yaml"
    text = (RECIPES / "vtab" / "mae" / "spt_deep.yaml").read_text()
    recipe.write_text(text.replace("num_prompts", "num_promts"))
    parser = build_parser()
    with pytest.raises(SystemExit):
        check_field_names(parser._subcommands_action._name_parser_map["train"], ["--config", str(recipe)])
