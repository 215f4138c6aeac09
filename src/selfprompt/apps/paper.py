"""Published numbers quoted beside benchmark tables (ViT-B/16; `SPT.md` section 6), each with its source.

Only numbers read in a source are here; values the reference marks as recalled or unverified are left out.
Keys: (benchmark, backbone recipe folder, method) -> {task, group or mean name: accuracy in %}.
"""

from __future__ import annotations

TASK_MEAN = "mean over tasks"
FGVC_TASKS = ("cub", "nabirds", "flowers", "dogs", "cars")


def _fgvc(values: tuple[float, ...], mean: float) -> dict[str, float]:
    return dict(zip(FGVC_TASKS, values, strict=True)) | {"fgvc": mean}


def _vtab(natural: float | None, specialized: float | None, structured: float | None) -> dict[str, float]:
    groups = {"natural": natural, "specialized": specialized, "structured": structured}
    return {k: v for k, v in groups.items() if v is not None}


PAPER: dict[tuple[str, str, str], dict[str, float]] = {
    # supervised IN-21k: VPT's numbers via DA-VPT Tables 1 and 3
    ("fgvc", "sup_in21k", "full"): _fgvc((87.3, 82.7, 98.8, 89.4, 84.5), 88.54),
    ("fgvc", "sup_in21k", "linear"): _fgvc((85.3, 75.9, 97.9, 86.2, 51.3), 79.32),
    ("fgvc", "sup_in21k", "vpt-shallow"): _fgvc((86.7, 78.8, 98.4, 90.7, 68.7), 84.62),
    ("fgvc", "sup_in21k", "vpt-deep"): _fgvc((88.5, 84.2, 99.0, 90.2, 83.6), 89.11),
    ("vtab-1k", "sup_in21k", "full"): _vtab(75.88, 83.36, 47.64),
    ("vtab-1k", "sup_in21k", "vpt-shallow"): _vtab(76.81, 79.68, 46.98),
    ("vtab-1k", "sup_in21k", "vpt-deep"): _vtab(78.48, 82.43, 54.98),
    # MAE IN-1k: GaPT's baselines via DA-VPT Table 1; SPT via BPT, VIPAMIN and sotaverified
    ("fgvc", "mae", "full"): _fgvc((80.55, 77.87, 91.71, 80.38, 83.51), 82.80),
    ("fgvc", "mae", "vpt-shallow"): _fgvc((42.15, 57.43, 69.15, 77.07, 43.38), 57.84),
    ("fgvc", "mae", "vpt-deep"): {"fgvc": 72.02},
    ("fgvc", "mae", "spt-shallow"): _fgvc((71.15, 61.87, 89.47, 80.01, 67.23), 73.95),
    ("fgvc", "mae", "spt-deep"): _fgvc((80.13, 76.28, 93.07, 82.23, 84.61), 83.26),
    ("vtab-1k", "mae", "full"): _vtab(59.31, 79.68, 53.82) | {TASK_MEAN: 61.28},
    ("vtab-1k", "mae", "vpt-shallow"): _vtab(39.96, 69.65, 27.50),
    ("vtab-1k", "mae", "vpt-deep"): _vtab(36.02, 60.61, 26.57),
    ("vtab-1k", "mae", "spt-shallow"): _vtab(62.53, 80.90, 53.46) | {TASK_MEAN: 62.58},
    ("vtab-1k", "mae", "spt-deep"): _vtab(67.19, None, None),
    # MoCo v3 IN-1k: same sources
    ("fgvc", "moco", "full"): {"fgvc": 84.25},
    ("fgvc", "moco", "vpt-shallow"): {"fgvc": 79.26},
    ("fgvc", "moco", "vpt-deep"): {"fgvc": 83.12},
    ("vtab-1k", "moco", "full"): _vtab(71.95, 84.72, 51.98) | {TASK_MEAN: 66.23},
    ("vtab-1k", "moco", "vpt-shallow"): _vtab(67.34, 82.26, 37.55),
    ("vtab-1k", "moco", "vpt-deep"): _vtab(70.27, 83.04, 42.38),
    ("vtab-1k", "moco", "spt-shallow"): _vtab(74.47, 83.93, 55.16) | {TASK_MEAN: 68.33},
    ("vtab-1k", "moco", "spt-deep"): _vtab(76.20, None, None),
}

SOURCES = (
    "quoted, not measured here (SPT.md section 6): supervised IN-21k rows are VPT's (via DA-VPT Tables 1 "
    "and 3); MAE and MoCo v3 baselines are GaPT's (via DA-VPT Table 1); SPT rows come from secondary sources "
    "(BPT for FGVC, VIPAMIN and sotaverified for VTAB) as the SPT paper's body could not be read; 'mean over "
    "tasks' is VIPAMIN's task-weighted 19-task mean. Published runs used other recipes and selection."
)


def quoted(benchmark: str, backbone: str, method: str) -> dict[str, float]:
    """The published numbers for a table column (empty when there are none)."""
    return PAPER.get((benchmark, backbone, method), {})
