"""The shipped recipes parse through the real CLI exactly as ``selfprompt train RECIPE ...`` does.

Nothing here builds a model or touches the network: the recipes are only parsed and checked.
"""

import re
from pathlib import Path

from selfprompt.apps.bench import RECIPES as PACKAGE_RECIPES
from selfprompt.cli import build_parser
from selfprompt.cli.common import UsageError, config_from, prepare_config_argv
from selfprompt.config import TrainConfig
from selfprompt.data import registry
from selfprompt.engine.build import method_settings
from selfprompt.methods import get_method, method_names

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
METHODS = tuple(name.replace("-", "_") for name in method_names())
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# prompt methods with their papers' prompt count and own-section settings (METHODS.md 5-8)
PROMPT_METHODS = {
    "gapt": (100, {"gate_init": 10.0}),
    "e2vpt": (10, {"kv_length": 5, "share_kv": True}),
    "vfpt": (10, {"fourier_share": 0.5}),
    "cvpt": (10, {}),
    "apt": (50, {"rank": 4}),
    "ipt": (10, {"form": "relevance", "vocabulary_size": 64, "hidden": 64}),
}


def parse(recipe: Path, *overrides: str) -> TrainConfig:
    """What ``selfprompt train RECIPE --data.root ... --output_dir ... OVERRIDES`` resolves to (cli.main)."""
    argv = [str(recipe), "--data.root", "/data/task", "--output_dir", "/runs/task", *overrides]
    try:
        ns = build_parser().parse_args(["train", *prepare_config_argv(argv, TrainConfig)])
    except (SystemExit, UsageError) as error:  # jsonargparse reports errors by exiting
        pytest.fail(f"{recipe.relative_to(REPO)} does not parse ({error}); see stderr")
    assert ns.command == "train"
    return config_from(ns["train"], TrainConfig)


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
    m, d, o, p = cfg.model, cfg.data, cfg.optim, cfg.prompt
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
        assert p.num_prompts == 20
    elif name.endswith("shallow"):
        assert p.num_prompts == 100
    elif name in PROMPT_METHODS:
        assert p.num_prompts == PROMPT_METHODS[name][0]
    elif name == "bpt":  # BPT-shallow: the official scripts' 100 prompts, rank 75 (supervised CUB: 25)
        assert p.num_prompts == 100
        rank, whitening = (25, False) if backbone == "sup_in21k" else (75, backbone == "mae")
        assert (cfg.bpt.deep, cfg.bpt.rank, cfg.bpt.whitening) == (False, rank, whitening)
    else:
        assert p.num_prompts is None
    # APT's dropout acts on its scores, the official attention dropout 0
    assert p.dropout == (0.1 if name == "vpt_deep" or (name in PROMPT_METHODS and name != "apt") else 0.0)
    assert m.drop_path == (0.1 if name == "full" else 0.0)
    method, settings = method_settings(cfg)  # the recipe's settings are ones its method reads
    expected_init = {
        "spt": "sample",
        "vpt": "xavier",
        **dict.fromkeys(PROMPT_METHODS, "xavier"),
        "ipt": "kmeans",
        "bpt": "xavier",  # its only init: the codes' random draw
    }.get(name.split("_")[0])
    if name in PROMPT_METHODS:  # each paper's own settings, its own section
        for key, value in PROMPT_METHODS[name][1].items():
            assert getattr(getattr(cfg, name), key) == value, key
    assert (method.initializer(settings.init) if method.has_prompts else None) == expected_init
    if name.startswith("spt"):
        assert p.init == "sample"

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

    assert (d.batch_size, o.epochs, o.warmup_epochs, o.min_lr) == (
        32,
        100,
        10,
        1e-5 if name == "cvpt" else 1e-8,
    )
    assert all(isinstance(v, float) for v in (o.lr, o.weight_decay, o.head_weight_decay, o.min_lr))
    if name.endswith("deep"):
        deep = (1e-3, 1e-2, 3.0) if backbone == "sup_in21k" else (5e-2, 1e-2, 0.5)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == deep
    elif name.endswith("shallow"):
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (1e-5, 0.05, 1.0)
    elif name == "lora":  # NOAH's VTAB setting (METHODS.md 1)
        lora = cfg.lora
        assert (lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)) == (8, 8.0, 0.1, ("qkv",))
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (1e-3, 1e-4, 1e-4)
    elif name == "adaptformer":  # V-PETL's b=8, s=1.0; the official dropout (METHODS.md 3)
        a = cfg.adaptformer
        assert (a.bottleneck, a.scale, a.dropout) == (8, 1.0, 0.1)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (1e-3, 1e-4, 1e-4)
    elif name == "ssf":  # SSF's scripts (METHODS.md 4): CIFAR-100's lr, EMA on FGVC
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (5e-3, 5e-5, 5e-5)
        assert o.ema_decay == (0.9998 if benchmark == "fgvc" else None)
    elif name in ("e2vpt", "vfpt", "ipt"):  # VPT-deep's AdamW values (their papers tuned SGD; IPT: none)
        deep = (1e-3, 1e-2, 3.0) if backbone == "sup_in21k" else (5e-2, 1e-2, 0.5)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == deep
    elif name == "gapt":  # its wd 0; AdamW rates of vpt_deep (GaPT tuned SGD)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (
            1e-3 if backbone == "sup_in21k" else 5e-2,
            0,
            0,
        )
    elif name == "pc":  # fine-tuning kept prompts: a fifth of vpt_deep's rate (ours)
        deep = (2e-4, 1e-2, 3.0) if backbone == "sup_in21k" else (1e-2, 1e-2, 0.5)
        assert (o.lr, o.weight_decay, o.head_weight_decay) == deep
    elif name == "bpt":  # the official CUB scripts' AdamW values
        bpt = {"mae": (5e-2, 5e-3, 0.5), "moco": (5e-2, 5e-3, 0.1), "sup_in21k": (5e-3, 0.1, 10.0)}
        assert (o.lr, o.weight_decay, o.head_weight_decay) == bpt[backbone]
    elif name == "cvpt":  # CVPT's own AdamW values
        assert (o.lr, o.weight_decay, o.head_weight_decay) == (1e-3, 0.05, 0.05)
    elif name == "apt":  # the official ViLT fine-tuning's AdamW values
        assert (o.lr, o.weight_decay, o.head_weight_decay, o.betas) == (5e-4, 1e-2, 1e-2, (0.9, 0.98))
    assert o.ema_decay is None or name == "ssf", "only the SSF FGVC recipes keep an EMA"


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
    with pytest.raises(UsageError, match=r"num_promts.*did you mean prompt\.num_prompts"):
        prepare_config_argv([str(recipe)], TrainConfig)


def test_recipes_of_the_old_layout_still_parse(tmp_path):
    """Fields that moved into the prompt section (model.num_prompts, model.init, ...) are migrated."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model:\n  method: spt-deep\n  num_prompts: 7\n  init: kmeans\n  prompt_dropout: 0.1\n")
    cfg = parse(recipe, "--model.deep_layers", "2")
    assert (cfg.prompt.num_prompts, cfg.prompt.init, cfg.prompt.dropout) == (7, "kmeans", 0.1)
    assert cfg.prompt.deep_layers == 2


def test_every_method_has_a_package_recipe():
    """selfprompt bench trains each registered method with its VTAB-mini recipe."""
    for name in method_names():
        assert (PACKAGE_RECIPES / f"{name.replace('-', '_')}.yaml").is_file(), name
        assert get_method(name).summary
