"""Many tasks on one frozen backbone: :class:`MultiTaskViT` runs a batch whose rows belong to different tasks.

Prompt adapters (``PromptedViT``, shallow or deep, any ``num_prompts``, ``deep_layers``, pooling and class
count), APT adapters (which insert no tokens: their rows join the linear probes' sequence length, and each
prompted block's attention output gets the row's own prompts' term, ``selfprompt.methods.apt.read_prompts``)
and linear probes (``ViTClassifier`` with a frozen backbone: zero prompts) share one pass through the
backbone: the rows are grouped by prompt length (each group gathers every row's prompts by its task id) and
the groups go through each block together, the token-wise layers once over all their tokens and attention
per group (:mod:`selfprompt.serving.packed`; blocks other than timm's plain ``Block`` run one group at a
time), which measured faster on CPU than one padded pass (README, Serving). With
``mask=True`` a batch is one pass instead: each row's prompts go into a slot as wide as the longest prompt
in the batch, the slot's unused positions left out of every attention by a key mask (SDPA's boolean
``attn_mask``, which timm's ``Block`` passes through) and out of ``mae`` pooling. Either way each row
computes what its own model computes. Deep prompts replace the slot before each of their layers only in
the rows whose task has prompts there. The heads run as one GEMM against the heads of the tasks present in
the batch, and each row keeps its own task's logits.

Methods that change the backbone's weights per task (``full``, ``bitfit``, any adapter holding
``backbone.*`` tensors) or that are another model class (whose seams this module cannot know) cannot share
the backbone's forward: their rows are grouped by task and run through that task's own model.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from selfprompt.adapter import WEIGHTS_NAME, check_signature
from selfprompt.backbones import backbone_info
from selfprompt.methods import load_pretrained
from selfprompt.methods.apt import APT, read_prompts
from selfprompt.methods.registry import backbone_sharing_classes
from selfprompt.model import POOL_TYPES, ViTClassifier, check_backbone
from selfprompt.serving.packed import AttentionTerm, packable, packed_block
from selfprompt.serving.sources import AdapterSource, resolve_source

import torch
from safetensors import safe_open
from torch import nn


@dataclass(frozen=True)
class Task:
    """A served task.

    Attributes:
        name: What requests call it.
        classes: Its class names, in logit order.
        shared: True when its rows share the backbone's forward (prompts, APT, linear probes); False when
            they run through ``model`` (a method that changes backbone weights).
        model: The task's own model (for a shared task: the wrapper its tensors were read from, on the shared
            backbone).
        source: Where it was loaded from.
    """

    name: str
    classes: list[str]
    shared: bool
    model: ViTClassifier
    source: AdapterSource

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_prompts(self) -> int:
        """The prompt tokens its rows carry in the sequence (APT's prompts are not in it: 0)."""
        return self.model.num_extra_tokens


class _Bank:
    """The tensors of one snapshot of the shared tasks, stacked by task index (immutable once built).

    ``prompts[i]``: (T, M_i, D), the layer-i prompts of every task (zeros past a task's own M, and for a task
    without prompts at layer i); ``replaces[i]``: (T,) bool, the tasks whose prompts enter at layer i (all
    prompted tasks at 0, deep ones at their first ``num_prompt_layers``); ``lengths``: (T,) prompts per
    task; ``weight``/``bias``: (T, C, D)/(T, C) heads padded to the widest; ``pools``: (T,) index into
    POOL_TYPES; ``attention_terms[i]``: APT's keys and prompts (T, M_i, D) (zeros past a task's own M and for
    every other task) and scales (T,) (ones for the others) at layer i, None where no task has them.
    """

    def __init__(
        self, tasks: list[Task], depth: int, embed_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.names = [t.name for t in tasks]
        self.lengths_list = [t.num_prompts for t in tasks]
        self.classes_list = [t.num_classes for t in tasks]
        self.pools_list = [POOL_TYPES.index(t.model.config.pool) for t in tasks]
        n = len(tasks)
        self.prompts: list[torch.Tensor] = []
        replaces = torch.zeros(depth, n, dtype=torch.bool)
        for layer in range(depth):
            width = 0
            for k, task in enumerate(tasks):
                if task.num_prompts and layer < task.model.num_prompt_layers:
                    replaces[layer, k] = True
                    width = max(width, task.num_prompts)
            bank = torch.zeros(n, width, embed_dim, device=device, dtype=dtype)
            for k, task in enumerate(tasks):
                if replaces[layer, k]:
                    bank[k, : task.num_prompts] = task.model.prompts[layer].detach()
            self.prompts.append(bank)
        self.replaces = replaces.to(device)
        self.lengths = torch.tensor(self.lengths_list, dtype=torch.long, device=device)
        self.classes = torch.tensor(self.classes_list, dtype=torch.long, device=device)
        self.pools = torch.tensor(self.pools_list, dtype=torch.long, device=device)
        width = max(self.classes_list, default=1)
        self.weight = torch.zeros(n, width, embed_dim, device=device, dtype=dtype)
        self.bias = torch.zeros(n, width, device=device, dtype=dtype)
        for k, task in enumerate(tasks):
            self.weight[k, : task.num_classes] = task.model.head.weight.detach()
            self.bias[k, : task.num_classes] = task.model.head.bias.detach()
        self.max_prompts = max(self.lengths_list, default=0)
        apt = {k: t.model.attention_terms() for k, t in enumerate(tasks) if isinstance(t.model, APT)}
        self.attention_terms = [_stacked_terms(apt, n, i, embed_dim, device, dtype) for i in range(depth)]


class MultiTaskViT(nn.Module):
    """One frozen timm ``VisionTransformer`` and any number of task adapters, run in mixed-task batches.

    Args:
        backbone: The frozen backbone every adapter was trained on (checked against each adapter's saved
            signature).
        backbone_name: The name adapters recorded (default: the backbone's own, as ``selfprompt train``
            saves it).
        mask: ``False`` (default): rows grouped by prompt length, no mask, the groups packed into one call
            per block (``packed``: timm's plain blocks) or run one after the other. ``True``: one pass with
            padded prompt slots and a key mask (blocks must accept ``attn_mask``).

    ``add_adapter``/``remove_adapter`` may run while another thread is in :meth:`forward`: a forward uses the
    snapshot of tasks it started with.
    """

    def __init__(self, backbone: nn.Module, backbone_name: str | None = None, mask: bool = False) -> None:
        super().__init__()
        self.family = check_backbone(backbone, frozenset({"serving"}), "the multi-task server")
        self.backbone = backbone.requires_grad_(False).eval()
        if backbone_name is None:
            backbone_name = backbone_info(backbone).adapter_name
        self.backbone_name = backbone_name
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.mask = mask and all(
            "attn_mask" in inspect.signature(block.forward).parameters for block in backbone.blocks
        )
        self.packed = packable(backbone.blocks)
        self._lock = threading.Lock()
        self._publish({})

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ...: the tasks' own models and the stacked bank follow the backbone."""
        super()._apply(fn, recurse)
        with self._lock:
            for task in self._tasks.values():
                if not task.shared:
                    task.model._apply(fn, recurse)
                else:
                    for param in task.model.adapter_parameters().values():
                        param.data = fn(param.data)
            self._publish(self._tasks)
        return self

    def train(self, mode: bool = True) -> MultiTaskViT:
        return super().train(False)  # serving only: the backbone and every task stay in eval mode

    # -- the task table ----------------------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, Task]:
        return dict(self._tasks)

    def add_adapter(
        self,
        name: str,
        path: str | Path,
        seed: int | None = None,
        stage: str | None = None,
        ema: bool = False,
        replace: bool = False,
        check_weights: bool = True,
    ) -> Task:
        """Serve the adapter in ``path`` (an adapter folder or a run folder) as task ``name``
        (``check_weights``: refuse it when the backbone's weights are not the ones it was trained on).

        Raises:
            ValueError: The name is taken (and not ``replace``), the adapter was made for another backbone
                (or other weights), or its class is one no registered method builds.
            FileNotFoundError: No adapter in ``path``.
        """
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError(f"A task name is a non-empty string of at most 200 characters, got {name!r}.")
        if name in self._tasks and not replace:
            raise ValueError(f"A task named {name!r} is already served; remove it or pass replace=True.")
        source = resolve_source(path, seed, stage, ema)
        config = source.config
        check_signature(config["backbone"], self.backbone, self.backbone_name, source.adapter)
        sharing = backbone_sharing_classes()
        shared = config["class"] in sharing and not _holds_backbone_tensors(source.adapter)
        # a method that changes backbone weights gets its own copy: the shared backbone never changes
        backbone = self.backbone if shared else copy.deepcopy(self.backbone)
        model = load_pretrained(source.adapter, backbone, self.backbone_name, check_weights)
        model.requires_grad_(False).eval()
        if shared and type(model).__name__ not in sharing:
            raise ValueError(f"{source.adapter}: {type(model).__name__} cannot share the backbone.")
        task = Task(name, source.complete(model, backbone), shared, model, source)
        with self._lock:
            tasks = {**self._tasks, name: task}
            self._publish(tasks)
        return task

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise KeyError(f"No task named {name!r}; tasks: {', '.join(self._tasks) or 'none'}.")
            tasks = {k: v for k, v in self._tasks.items() if k != name}
            self._publish(tasks)

    def _publish(self, tasks: dict[str, Task]) -> None:
        shared = [t for t in tasks.values() if t.shared]
        param = next(self.backbone.parameters())
        bank = _Bank(shared, len(self.backbone.blocks), self.backbone.embed_dim, param.device, param.dtype)
        # one assignment: a forward reads the whole snapshot (tasks, bank, bank index) once
        self._state = (tasks, bank, {t.name: i for i, t in enumerate(shared)})
        self._tasks, self._bank = tasks, bank

    # -- forward -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits of each row for its own task (row ``i`` of ``images`` belongs to ``tasks[i]``): a list of
        ``(num_classes of tasks[i],)`` tensors."""
        logits, counts = self.forward_padded(images, tasks)
        return [row[:n] for row, n in zip(logits, counts, strict=True)]

    @torch.no_grad()
    def forward_padded(self, images: torch.Tensor, tasks: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """``(B, C_max)`` logits, ``-inf`` past each row's class count, and the class counts."""
        table, bank, index = self._state
        if len(tasks) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images and {len(tasks)} task names: one task per row.")
        unknown = sorted({t for t in tasks if t not in table})
        if unknown:
            raise KeyError(f"Unknown task(s) {unknown}; tasks: {', '.join(table) or 'none'}.")
        counts = [table[t].num_classes for t in tasks]
        out = images.new_full((images.shape[0], max(counts)), float("-inf"))
        shared_rows = [i for i, t in enumerate(tasks) if table[t].shared]
        if shared_rows:
            ids = torch.tensor([index[tasks[i]] for i in shared_rows], device=images.device)
            rows = torch.tensor(shared_rows, device=images.device)
            sub = images if len(shared_rows) == len(tasks) else images[rows]
            groups = None
            if not self.mask:
                lengths = bank.lengths[ids]
                distinct = sorted(set(lengths.tolist()))
                if len(distinct) > 1:
                    groups = [(lengths == m).nonzero().squeeze(1) for m in distinct]
            logits = self.forward_shared(sub, ids, bank, groups=groups)
            width = min(logits.shape[1], out.shape[1])
            out[rows, :width] = logits[:, :width].to(out.dtype)
        for name in dict.fromkeys(t for t in tasks if not table[t].shared):
            group = torch.tensor([i for i, t in enumerate(tasks) if t == name], device=images.device)
            logits = table[name].model(images[group])
            out[group, : logits.shape[1]] = logits.to(out.dtype)
        return out, counts

    def forward_shared(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        bank: _Bank | None = None,
        static: bool = False,
        groups: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Padded logits ``(B, C_bank)`` of rows whose tasks share the backbone, ``ids`` indexing the bank;
        past a row's class count they are ``-inf``. ``groups``: row indices run as separate sequences (each
        of one prompt length, so unmasked), their blocks packed into one call where the blocks allow it;
        ``None``: one pass. ``static``: one pass in which no Python decision depends on ``ids`` (traceable
        for export: the prompt slot is the widest of all tasks, every pooling is computed)."""
        bank = bank if bank is not None else self._bank
        bb = self.backbone
        tokens = self.family.embed_tokens(bb, self.family.embed_patches(bb, images))
        if groups is None:
            passes = [self._enter(tokens, ids, bank, static)]
        else:
            passes = [self._enter(tokens[g], ids[g], bank, static) for g in groups]
        if groups is not None and self.packed:
            xs = self._packed(passes, bank)
        else:
            xs = [rows.x for rows in passes]
            for layer, block in enumerate(bb.blocks):
                if layer:
                    xs = [
                        self._replace(layer, x, r, bank, inplace=not static)
                        for x, r in zip(xs, passes, strict=True)
                    ]
                xs = [self._block(layer, block, x, r, bank) for x, r in zip(xs, passes, strict=True)]
        logits = [self._exit(x, rows, bank, static) for x, rows in zip(xs, passes, strict=True)]
        if groups is None:
            return logits[0]
        out = tokens.new_empty(len(ids), bank.weight.shape[1])
        for group, part in zip(groups, logits, strict=True):
            out[group] = part
        return out

    def _enter(self, tokens: torch.Tensor, ids: torch.Tensor, bank: _Bank, static: bool) -> _Pass:
        """A pass's embedded patch tokens, with their first prompts in a slot of the pass's width."""
        bb, p = self.backbone, self.num_prefix_tokens
        lengths = bank.lengths[ids]
        if static:
            width, pools, padded = bank.max_prompts, range(len(POOL_TYPES)), True
        else:
            present = sorted(set(ids.tolist()))
            row_lengths = {bank.lengths_list[k] for k in present}
            width, padded = max(row_lengths), len(row_lengths) > 1
            pools = sorted({bank.pools_list[k] for k in present})
        x = tokens
        batch, n_patches = x.shape[0], x.shape[1] - p
        if width:
            x = torch.cat([x[:, :p], bank.prompts[0][:, :width][ids], x[:, p:]], dim=1)
        slot = torch.arange(width, device=x.device)
        valid = slot[None, :] < lengths[:, None]  # (B, width): which slot positions are real prompts
        mask = None
        if padded and width:
            ones = valid.new_ones(batch, 1)
            keys = torch.cat([ones.expand(batch, p), valid, ones.expand(batch, n_patches)], dim=1)
            mask = keys[:, None, None, :]  # (B, 1, 1, N): SDPA's boolean mask, True = attend
        return _Pass(self.family.pre_blocks(bb, x), ids, lengths, width, valid, mask, pools)

    def _block(self, layer: int, block: nn.Module, x: torch.Tensor, rows: _Pass, bank: _Bank) -> torch.Tensor:
        """One block over one pass, with its key mask and the rows' APT terms."""
        term = _attention_term(bank, layer, rows.ids)
        if term is None:
            return block(x) if rows.mask is None else block(x, attn_mask=rows.mask)
        attention = block.attn if rows.mask is None else partial(block.attn, attn_mask=rows.mask)
        return self.family.residual_branches(block, x, None, layer, attn=lambda h: term(h, attention(h)))

    def _packed(self, passes: list[_Pass], bank: _Bank) -> list[torch.Tensor]:
        """The blocks over every pass at once (:func:`packed_block`); each pass's final tokens."""
        shapes = [tuple(rows.x.shape[:2]) for rows in passes]
        flat = torch.cat([rows.x.reshape(-1, rows.x.shape[-1]) for rows in passes])
        parts = flat.split([b * n for b, n in shapes])
        xs = [part.view(*shape, -1) for part, shape in zip(parts, shapes, strict=True)]
        for layer, block in enumerate(self.backbone.blocks):
            if layer:
                for x, rows in zip(xs, passes, strict=True):
                    self._replace(layer, x, rows, bank, inplace=True)
            terms = [_attention_term(bank, layer, rows.ids) for rows in passes]
            packed_block(block, flat, shapes, None if terms[0] is None else terms)
        return xs

    def _replace(self, layer: int, x: torch.Tensor, rows: _Pass, bank: _Bank, inplace: bool) -> torch.Tensor:
        """Deep prompts: the slot replaced before ``layer`` in the rows whose task has prompts there, in
        ``x`` itself (inference) or in a new tensor (``inplace=False``: traceable for export)."""
        p, prompts = self.num_prefix_tokens, bank.prompts[layer]
        k = min(rows.width, prompts.shape[1])
        if not k:
            return x
        new = torch.where(
            bank.replaces[layer][rows.ids][:, None, None], prompts[:, :k][rows.ids], x[:, p : p + k]
        )
        if inplace:
            x[:, p : p + k] = new
            return x
        return torch.cat([x[:, :p], new, x[:, p + k :]], dim=1)

    def _exit(self, x: torch.Tensor, rows: _Pass, bank: _Bank, static: bool) -> torch.Tensor:
        """Each row's pooling and head."""
        bb, p, ids, width = self.backbone, self.num_prefix_tokens, rows.ids, rows.width
        batch, n_patches = x.shape[0], x.shape[1] - p - width
        features = x.new_zeros(batch, bb.embed_dim)
        row_pools = bank.pools[ids]
        for pool in rows.pools:
            kind = POOL_TYPES[pool]
            if kind == "token":
                pooled = bb.fc_norm(bb.norm(x[:, 0]))
            elif kind == "avg":
                pooled = bb.fc_norm(bb.norm(x[:, p + width :]).mean(dim=1))
            else:  # mae: the mean over real prompts and patches, then the final norm
                weights = torch.cat([rows.valid.to(x.dtype), x.new_ones(batch, n_patches)], dim=1)
                total = (x[:, p:] * weights[:, :, None]).sum(dim=1)
                pooled = bb.fc_norm(bb.norm(total / (rows.lengths + n_patches).to(x.dtype)[:, None]))
            features = torch.where((row_pools == pool)[:, None], pooled, features)

        # the heads of the tasks in this batch as one GEMM ((B, D) x (D, U*C)); each row keeps its own task's
        # C columns (gathering a (B, C, D) weight per row instead costs B*C*D memory: 200 MB at C=1000)
        if static:
            used, inverse = torch.arange(bank.weight.shape[0], device=x.device), ids
        else:
            used, inverse = torch.unique(ids, return_inverse=True)
        width_c = bank.weight.shape[1]
        every = features @ bank.weight[used].reshape(-1, bb.embed_dim).T  # (B, U*C)
        index = inverse[:, None, None].expand(batch, 1, width_c)
        logits = every.view(batch, -1, width_c).gather(1, index).squeeze(1) + bank.bias[ids]
        columns = torch.arange(logits.shape[1], device=x.device)
        return logits.masked_fill(columns[None, :] >= bank.classes[ids][:, None], float("-inf"))


@dataclass(frozen=True)
class _Pass:
    """The rows of one sequence length in a forward: their tokens, bank ids, prompt counts, slot width, which
    slot positions hold real prompts ``(B, width)``, the key mask (padded slots only) and the poolings."""

    x: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor
    width: int
    valid: torch.Tensor
    mask: torch.Tensor | None
    pools: Sequence[int]


def _stacked_terms(
    apt: dict[int, list[tuple[torch.Tensor, ...]]],
    n: int,
    layer: int,
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The APT keys, prompts and scales at ``layer`` of ``n`` tasks, stacked by task (see :class:`_Bank`);
    ``apt``: task index -> its :meth:`~selfprompt.methods.apt.APT.attention_terms`."""
    terms = {k: layers[layer] for k, layers in apt.items() if layer < len(layers)}
    if not terms:
        return None
    width = max(keys.shape[0] for keys, _, _ in terms.values())
    keys = torch.zeros(n, width, dim, device=device, dtype=dtype)
    prompts, scales = torch.zeros_like(keys), torch.ones(n, device=device, dtype=dtype)
    for k, (key, prompt, scale) in terms.items():
        keys[k, : len(key)], prompts[k, : len(prompt)], scales[k] = key, prompt, scale
    return keys, prompts, scales


def _attention_term(bank: _Bank, layer: int, ids: torch.Tensor) -> AttentionTerm | None:
    """``out -> (out + read_prompts(h)) * scale`` for rows ``ids`` at ``layer``: exactly ``out`` for a row of
    a task without APT prompts there; None when no task has them."""
    terms = bank.attention_terms[layer]
    if terms is None:
        return None
    keys, prompts, scales = (t[ids] for t in terms)
    return lambda h, out: (out + read_prompts(h, keys, prompts)) * scales[:, None, None]


def _holds_backbone_tensors(adapter: Path) -> bool:
    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as weights:
        return any(key.startswith("backbone.") for key in weights.keys())  # noqa: SIM118
