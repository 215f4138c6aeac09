"""PETL methods by name: what each trains, how it wraps a frozen timm ViT, its settings and its prompts' init.

Each module of :mod:`selfprompt.methods` registers its methods here with :func:`register_method` (and its
settings section with :func:`register_settings`); every other part of the library (config, CLI, engine,
bench, adapter loading) asks the registry instead of knowing method names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from selfprompt.backbones import backbone_family
from selfprompt.model import PoolType, UnsupportedBackbone, ViTClassifier

from torch import nn
from torch.utils.data import DataLoader

Builder = Callable[..., ViTClassifier]


@dataclass(frozen=True)
class Search:
    """A method's default hyperparameter grid for ``selfprompt bench --search default`` and its source.

    Attributes:
        grid: Dotted config field -> values (``{"optim.lr": [...], "optim.weight_decay": [...]}``).
        source: Where the values come from (paper, official code, or "ours"), as the recipes tag theirs.
    """

    grid: dict[str, list[Any]]
    source: str


Preparer = Callable[["Method", ViTClassifier, Any, DataLoader, int], None]
ScoringSource = Callable[..., tuple[Any, ViTClassifier, DataLoader, dict[str, Any]]]


@dataclass(frozen=True)
class StageCommand:
    """``selfprompt <name> RUN_DIR ...``: a method's second stage on one of its trained runs (E2VPT's
    ``prune``, Prompt Condensation's ``condense``), which the CLI adds to its command table.

    Attributes:
        name: The command word.
        help: One line for ``selfprompt --help``.
        description: The paragraph of ``selfprompt <name> --help``.
        arguments: ``arguments(parser)`` adds its options beside the trained-run ones (``run_dir``,
            ``--seed``, ``--stage``, ``--device``, ``--ema``).
        run: ``run(args, source)`` runs the parsed arguments; ``source(run_dir, seed, stage, device,
            model_class, wanted)`` loads the trained run to score (config, model, loader of its stage's
            training images, the scoring's key), handed in by the CLI since loading a run is the engine's
            (``selfprompt.engine.trained.scoring_source``), above this package.
    """

    name: str
    help: str
    description: str
    arguments: Callable[[Any], None]
    run: Callable[[Any, ScoringSource], None]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: The name everywhere: ``--model.method``, recipes, bench cells.
        summary: One line for ``--help`` and tables.
        model_class: The model it builds (its name is what ``adapter_config.json`` records).
        build: ``build(backbone, num_classes, settings, *, pool, head_init_std, backbone_name)`` -> model;
            ``settings`` is the instance of the method's settings section (None without one).
        settings: Name of the config section it reads (see :func:`register_settings`), or None.
        default_init: Its prompts' initializer when ``init`` is not set; None for methods without prompts.
        inits: The initializers it accepts (None: any registered one).
        other_inits: Where to go for an initializer it refuses (e.g. "spt-deep").
        prepare: ``prepare(method, model, settings, loader, seed)`` before the first step: initialises
            prompts from the training images (``loader``, eval transforms); None when nothing depends on
            the data.
        order: Position in listings (the built-ins first).
        extra_settings: Further sections it reads besides ``settings`` (e.g. ``("gapt",)`` next to
            ``prompt``); ``build`` and ``prepare`` then get ``settings``'s fields plus each further section as
            an attribute of its name (:meth:`settings_of`).
        check: ``check(settings, cfg)``: refuses a combination of settings (``cfg``: the whole TrainConfig)
            the method cannot run; called by :meth:`settings_of`, i.e. before anything is built.
        resolve: ``resolve(settings, cfg)`` -> the settings ``build`` and ``prepare`` read, after ``check``:
            what a method reads from files, read once per run (E2VPT's pruning record as masks).
        condenses: The method whose trained run ``selfprompt condense`` turns into this one's start (``pc``:
            ``vpt-deep``); ``bench`` trains that cell first. Empty for methods that start from the backbone.
        search: Its default grid for the protocol's search (``bench --search default``), None without one.
        commands: Its second stage's commands (:class:`StageCommand`), empty for most methods.
        shares_backbone: Its adapters (those holding no ``backbone.*`` tensors) run through the backbone's
            forward shared by a multi-task server (:mod:`selfprompt.serving.multitask` knows the seams of
            the plain classifier, of input prompts and of APT's attention term only); False runs its tasks
            through their own models.
    """

    name: str
    summary: str
    model_class: type[ViTClassifier]
    build: Builder
    settings: str | None = None
    default_init: str | None = None
    inits: tuple[str, ...] | None = None
    other_inits: str = ""
    prepare: Preparer | None = None
    order: int = 100
    extra_settings: tuple[str, ...] = ()
    check: Callable[[Any, Any], None] | None = None
    resolve: Callable[[Any, Any], Any] | None = None
    condenses: str = ""
    search: Search | None = None
    commands: tuple[StageCommand, ...] = ()
    shares_backbone: bool = False

    @property
    def sections(self) -> tuple[str, ...]:
        """Every config section it reads."""
        return (self.settings, *self.extra_settings) if self.settings else ()

    def settings_of(self, cfg: Any) -> Any:
        """Its settings in ``cfg`` (a TrainConfig): the ``settings`` section, or with ``extra_settings`` a
        namespace of that section's fields plus each further section by its name; checked by ``check`` and
        resolved by ``resolve``."""
        if not self.settings:
            return None
        settings = self._combined(cfg)
        if self.check is not None:
            self.check(settings, cfg)
        return self.resolve(settings, cfg) if self.resolve is not None else settings

    def default_settings(self) -> Any:
        """Its settings with every section at its defaults, what a run without a recipe reads (defaults pass
        every ``check``, and ``resolve`` reads no file for them)."""
        if not self.settings:
            return None
        defaults = SimpleNamespace(**{name: _SETTINGS[name].cls() for name in self.sections})
        settings = self._combined(defaults)
        return self.resolve(settings, None) if self.resolve is not None else settings

    def _combined(self, sections: Any) -> Any:
        settings = getattr(sections, self.settings)
        if not self.extra_settings:
            return settings
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        return SimpleNamespace(**fields, **{name: getattr(sections, name) for name in self.extra_settings})

    @property
    def has_prompts(self) -> bool:
        return self.default_init is not None

    def initializer(self, init: str | None) -> str | None:
        """The prompt initializer to use when the config asks for ``init`` (None: the default)."""
        if not self.has_prompts:
            if init is not None:
                raise ValueError(f"method {self.name!r} has no prompts; drop prompt.init ({init!r}).")
            return None
        if init is None:
            return self.default_init
        if self.inits is not None and init not in self.inits:
            where = f" use {self.other_inits}" if self.other_inits else " choose another method"
            raise ValueError(
                f"{self.name} initialises its prompts with {' or '.join(self.inits)}; for "
                f"prompt.init={init!r}{where}."
            )
        return init

    def create(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: Any = None,
        *,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        backbone_name: str | None = None,
    ) -> ViTClassifier:
        """Wrap ``backbone`` as this method's model; ``settings`` None is :meth:`default_settings`
        (``selfprompt.get_model`` takes them as keywords, checked as the CLI checks them). A backbone it
        cannot run on is refused naming the methods that can."""
        try:
            return self.build(
                backbone,
                num_classes,
                self.default_settings() if settings is None else settings,
                pool=pool,
                head_init_std=head_init_std,
                backbone_name=backbone_name,
            )
        except UnsupportedBackbone as error:
            family = error.family.model_class.__name__
            raise TypeError(
                f"{self.name}: {error} On timm's {family} selfprompt runs: "
                f"{', '.join(applicable_methods(backbone))}."
            ) from error


@dataclass(frozen=True)
class Settings:
    """A config section: its name (``--<name>.<field>``), dataclass, one-line help and the fields it took
    over from an older config layout (``{"model.old_field": "new_field"}``)."""

    name: str
    cls: type
    help: str
    legacy: dict[str, str] = dataclasses.field(default_factory=dict)


def settings_builder(model_class: type[ViTClassifier]) -> Builder:
    """The ``build`` of a model whose keyword arguments are its settings section's field names."""

    def build(backbone: nn.Module, num_classes: int, settings: Any, **common: Any) -> ViTClassifier:
        return model_class(backbone, num_classes, **dataclasses.asdict(settings), **common)

    return build


_METHODS: dict[str, Method] = {}
_SETTINGS: dict[str, Settings] = {}


def register_method(
    name: str, summary: str, model_class: type[ViTClassifier], build: Builder, **options
) -> Method:
    """Add a method; ``options`` are the other :class:`Method` fields."""
    if name in _METHODS:
        raise ValueError(f"A method named {name!r} is already registered.")
    for settings in (options.get("settings"), *options.get("extra_settings", ())):
        if settings is not None and settings not in _SETTINGS:
            raise ValueError(f"Method {name!r} reads settings section {settings!r}: register it first.")
    method = Method(name, summary, model_class, build, **options)
    _METHODS[name] = method
    return method


def register_settings(name: str, cls: type, help: str, legacy: dict[str, str] | None = None) -> None:
    """Add a config section ``name`` read by one or more methods."""
    if name in _SETTINGS:
        raise ValueError(f"A settings section named {name!r} is already registered.")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"Settings section {name!r} must be a dataclass, got {cls!r}.")
    _SETTINGS[name] = Settings(name, cls, help, dict(legacy or {}))


def method_names() -> list[str]:
    """Every registered method, in listing order."""
    return [m.name for m in sorted(_METHODS.values(), key=lambda m: m.order)]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; methods: {', '.join(method_names())}.") from None


def settings_sections() -> dict[str, Settings]:
    return dict(_SETTINGS)


def model_classes() -> dict[str, type[ViTClassifier]]:
    """The model class of every method by class name (what ``adapter_config.json`` records)."""
    return {m.model_class.__name__: m.model_class for m in _METHODS.values()}


def backbone_sharing_classes() -> frozenset[str]:
    """The names of the model classes whose adapters share a multi-task server's backbone forward: those of
    the methods registered with ``shares_backbone``."""
    return frozenset(m.model_class.__name__ for m in _METHODS.values() if m.shares_backbone)


def applicable_methods(backbone: nn.Module) -> list[str]:
    """The methods that run on ``backbone``: those whose model needs nothing its family lacks
    (:attr:`ViTClassifier.needs`, :attr:`selfprompt.backbones.BackboneFamily.capabilities`)."""
    family = backbone_family(backbone)
    return [name for name in method_names() if family.missing(_METHODS[name].model_class.needs) is None]


def stage_commands() -> list[StageCommand]:
    """The second-stage commands of every method, in listing order."""
    return [c for m in sorted(_METHODS.values(), key=lambda m: m.order) for c in m.commands]
