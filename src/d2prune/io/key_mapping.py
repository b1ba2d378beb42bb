"""A checkpoint's tensors as a model's parameters, by transformers' own loading rules.

transformers 5 does not load every checkpoint tensor under its own name:
``from_pretrained`` renames keys (Mixtral's ``block_sparse_moe`` is the
model's ``mlp``, GPT-NeoX's ``embed_out`` its ``lm_head``) and converts
tensors (one ``[I, H]`` tensor per expert and projection is stacked and
concatenated into the fused ``gate_up_proj [E, 2I, H]``). ``save_pretrained``
writes the checkpoint's own layout back by the reverse conversion. The
streamed path (:mod:`d2prune.io.streaming`) reads one block at a time, so it
cannot hand the whole checkpoint to ``from_pretrained``; :class:`KeyMapping`
applies the very same rules to any subset of parameters instead:

* the transforms are transformers' (``get_model_conversion_mapping``, the list
  ``from_pretrained`` builds for the model), every checkpoint key is renamed by
  its ``rename_source_key`` in the order ``from_pretrained`` visits them
  (``dot_natural_key``: experts stacked 0, 1, 2, ...), and the tensors of one
  parameter are merged by a copy of the matching ``WeightConverter`` whose
  ``convert`` runs its own operations;
* the transforms that matched a key are kept, as ``from_pretrained`` keeps them
  in ``model._weight_conversions``, and :meth:`KeyMapping.revert` undoes them
  with transformers' ``revert_weight_conversion`` - what ``save_pretrained``
  does - on one group of parameters at a time.

Nothing here names an architecture: whatever transformers knows how to load,
this reads, and a checkpoint that does not give every parameter is refused
before any tensor is read (the shapes are checked on the meta device).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import D2PruneError, first_line


@dataclass
class Group:
    """The checkpoint tensors one parameter (or several, for a split) is built from.

    ``target``: the first parameter name (transformers' key for the
    conversion), ``targets``: every parameter the conversion makes,
    ``converter``: the ``WeightConverter`` that merges ``sources`` (None for a
    tensor only renamed), ``sources``: ``(checkpoint key, source pattern)`` in
    the order ``from_pretrained`` collects them."""

    target: str
    targets: tuple[str, ...]
    converter: object | None
    sources: list[tuple[str, str]] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.sources]


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _template(key: str) -> tuple[str, tuple[int, ...]]:
    """``key`` with its numeric components taken out: ``(a.#.b.#.w, (0, 3))``."""
    parts = key.split(".")
    return ".".join("#" if p.isdigit() else p for p in parts), tuple(int(p) for p in parts if p.isdigit())


def _fill(template: str, numbers: tuple[int, ...]) -> str:
    it = iter(numbers)
    return ".".join(str(next(it)) if p == "#" else p for p in template.split("."))


class KeyMapping:
    """How the tensors named ``names`` of a checkpoint become ``model``'s
    parameters and persistent buffers (``model``: the skeleton, on the meta
    device or not)."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        conversions = get_model_conversion_mapping(model)  # what from_pretrained builds (no key_mapping, no quantizer)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        state = model.state_dict()  # the names from_pretrained loads into (buffers too); meta tensors cost nothing
        # shape and dtype of every parameter and persistent buffer (DeepSeek-V3's router keeps a trained bias in one)
        self.wanted = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
        prefix = model.base_model_prefix
        self.groups: dict[str, Group] = {}
        self.unused: list[str] = []  # checkpoint tensors no parameter is made of
        for key in sorted(names, key=dot_natural_key):
            # as convert_and_load_state_dict_in_model: the renamings, at most one converter, the base-model prefix
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)
            if renamed not in state and key in state:
                renamed, pattern = rename_source_key(key, [], [], prefix, state)
            if renamed not in state:
                self.unused.append(key)
                continue
            group = self.groups.get(renamed)
            if group is None:
                conv = by_pattern[pattern] if pattern is not None else None
                targets = (renamed,) if conv is None else tuple(
                    renamed.replace(conv.target_patterns[0], t) for t in conv.target_patterns)
                group = self.groups[renamed] = Group(renamed, targets, conv)
            if group.converter is not None:  # (a key only renamed into a converter's target counts under its own name)
                group.sources.append((key, pattern if pattern is not None else key))
            elif not group.sources:  # a plain renaming loads the first tensor of its name
                group.sources.append((key, key))
        self.of = {t: g for g in self.groups.values() for t in g.targets}
        # kept like from_pretrained keeps them, so that save_pretrained (and :meth:`revert`) writes this layout back
        self.conversions = [c for c in conversions if c.was_used()]
        model._weight_conversions = self.conversions

    # ------------------------------------------------------------------ reading
    def missing(self, names: Iterable[str]) -> list[str]:
        """The parameters of ``names`` that no checkpoint tensor gives."""
        return [n for n in names if n not in self.of]

    def expected_name(self, param: str) -> str:
        """The checkpoint name ``param`` would be read from (for messages): the
        reverse transforms applied to its name (``*`` for the expert index)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        reverse = [c.reverse_transform() for c in get_model_conversion_mapping(self.model, add_legacy=False)[::-1]]
        name, _ = rename_source_key(param, [c for c in reverse if isinstance(c, WeightRenaming)],
                                    [c for c in reverse if isinstance(c, WeightConverter)], reverse=True)
        return name

    def groups_of(self, names: Iterable[str]) -> list[Group]:
        """The groups that make ``names``, each once, in order."""
        out: dict[str, Group] = {}
        for n in names:
            g = self.of.get(n)
            if g is None:
                raise D2PruneError(f"the checkpoint has no tensor for parameter {n}")
            out.setdefault(g.target, g)
        return list(out.values())

    def checkpoint_names(self, names: Iterable[str]) -> list[str]:
        """The checkpoint tensors ``names`` are made of."""
        return [k for g in self.groups_of(names) for k in g.keys]

    def build(self, group: Group, tensors: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
        """``group``'s parameters from its checkpoint tensors (``tensors``, by
        checkpoint name: consumed), cast to the parameters' dtypes first as
        ``from_pretrained`` casts them, then converted; shapes checked."""
        shapes = {k: tuple(tensors[k].shape) for k in group.keys}
        dtype = self.wanted.get(group.target, (None, None))[1]
        cast = {k: (tensors.pop(k).to(dtype) if dtype is not None else tensors.pop(k)) for k in group.keys}
        out = self._convert(group, cast, shapes, where)
        for name, t in out.items():
            want = self.wanted.get(name, (None,))[0]
            if want is not None and tuple(t.shape) != want:
                raise D2PruneError(self._diagnose(group, shapes, where, None, name, tuple(t.shape), want))
        return {n: t for n, t in out.items() if n in self.wanted}

    def read(self, names: Iterable[str], get_many: Callable[[list[str]], dict[str, Tensor]],
             where: str = "") -> dict[str, Tensor]:
        """The parameters ``names``, each built from its checkpoint tensors
        (``get_many``: checkpoint names -> tensors), one group at a time: no
        more than one parameter's sources are held beside what is returned."""
        names = list(names)
        out: dict[str, Tensor] = {}
        for g in self.groups_of(names):
            out.update(self.build(g, get_many(g.keys), where))
        return {n: out[n] for n in names}

    def _convert(self, group: Group, cast: dict[str, Tensor], shapes: dict[str, tuple], where: str) -> dict[str, Tensor]:
        """``group``'s parameters made from its (cast) checkpoint tensors by a copy of its converter (consumed)."""
        if group.converter is None:
            return {group.target: cast[group.keys[0]]}
        conv = copy.deepcopy(group.converter)
        for key, pattern in group.sources:
            conv.add_tensor(group.target, key, pattern, cast.pop(key))
        try:
            made = conv.convert(group.target, model=self.model, config=self.model.config)
        except Exception as e:
            raise D2PruneError(self._diagnose(group, shapes, where, e)) from e
        return {k: (v[0] if isinstance(v, list) else v) for k, v in made.items()}

    def read_rows(self, name: str, start: int, stop: int, get_many: Callable[[list[str]], dict[str, Tensor]],
                  get_rows: Callable[[str, int, int], Tensor], where: str = "") -> Tensor:
        """Rows ``start:stop`` (experts, along the first dimension) of the 3-D
        parameter ``name``, equal to ``read([name])[name][start:stop]`` but
        reading only those experts' checkpoint tensors: one tensor per expert
        and projection (the per-expert checkpoints: those of the experts
        asked for, merged by the parameter's own converter), or the rows of a
        fused checkpoint tensor (``get_rows(key, start, stop)``)."""
        group = self.groups_of([name])[0]
        want, dtype = self.wanted[name]
        if len(group.targets) != 1:
            raise D2PruneError(f"{where}: {name} is made together with {len(group.targets) - 1} other parameters; "
                               "its experts cannot be read in groups")
        by_pattern: dict[str, list[str]] = {}
        for key, pattern in group.sources:
            by_pattern.setdefault(pattern, []).append(key)
        counts = {len(keys) for keys in by_pattern.values()}
        rows = stop - start
        if counts == {want[0]}:  # one tensor per expert (in expert order, as from_pretrained stacks them)
            picked = {k for keys in by_pattern.values() for k in keys[start:stop]}
            sub = Group(group.target, group.targets, group.converter, [s for s in group.sources if s[0] in picked])
            tensors = get_many(sub.keys)
        elif counts == {1}:  # fused in the checkpoint too: its rows
            sub = group
            tensors = {k: get_rows(k, start, stop) for k in group.keys}
        else:
            raise D2PruneError(f"{where}: {name} is built from {sorted(counts)} checkpoint tensors per source; its "
                               "experts cannot be read in groups")
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        out = self._convert(sub, {k: t.to(dtype) for k, t in tensors.items()}, shapes, where)[name]
        if tuple(out.shape) != (rows, *want[1:]):
            raise D2PruneError(self._diagnose(sub, shapes, where, None, name, tuple(out.shape), (rows, *want[1:])))
        return out

    def check(self, shapes: dict[str, tuple[int, ...]], names: Iterable[str], where: str = "") -> None:
        """Every group of ``names`` built on the meta device from the checkpoint
        tensors' shapes (no data read): a missing expert, a tensor of the wrong
        shape is refused now, by name, before any block is pruned."""
        for g in self.groups_of(names):
            self.build(g, {k: torch.empty(shapes[k], device="meta") for k in g.keys}, where)

    def _diagnose(self, group: Group, shapes: dict[str, tuple], where: str, error: Exception | None,
                  name: str | None = None, got: tuple | None = None, want: tuple | None = None) -> str:
        """One line naming the checkpoint tensor that keeps ``group`` from being built."""
        at = f"{where}: " if where else ""
        cls = type(self.model).__name__
        by_pattern: dict[str, list[str]] = {}
        for key, pattern in group.sources:
            by_pattern.setdefault(pattern, []).append(key)
        # a tensor whose shape differs from its siblings' (the other experts' same projection)
        for keys in by_pattern.values():
            common, _ = Counter(shapes[k] for k in keys).most_common(1)[0]
            odd = [k for k in keys if shapes[k] != common]
            if odd and len(keys) > 2:
                return (f"{at}tensor {odd[0]} has shape {_shape(shapes[odd[0]])} where the other {len(keys) - 1} "
                        f"tensors it is merged with into {group.target} have {_shape(common)}")
        # a tensor whose siblings are there (one expert's projection missing, or an index skipped)
        templates: dict[str, set[tuple[int, ...]]] = {}
        for keys in by_pattern.values():
            for k in keys:
                t, numbers = _template(k)
                templates.setdefault(t, set()).add(numbers)
        union = set().union(*templates.values()) if templates else set()
        varying = [j for j in range(len(next(iter(union), ()))) if len({u[j] for u in union}) > 1]
        if len(varying) == 1 and all(len(u) == len(next(iter(union))) for u in union):
            j = varying[0]
            base = next(iter(union))
            union |= {base[:j] + (e,) + base[j + 1:] for e in range(max(u[j] for u in union) + 1)}
        for t, have in templates.items():
            lacking = sorted(union - have)
            if lacking:
                return (f"{at}tensor {_fill(t, lacking[0])} is missing from the checkpoint ({group.target} of {cls} is "
                        f"merged from one such tensor per index; {len(have)} of {len(union)} are there)")
        if error is not None:
            return (f"{at}could not build {group.target} of {cls} from the checkpoint tensors {group.keys[0]} ... "
                    f"({len(group.keys)}): {type(error).__name__}: {first_line(error)}")
        if group.converter is None:
            return (f"{at}tensor {group.keys[0]} has shape {_shape(shapes[group.keys[0]])}; {cls} wants {name} "
                    f"of shape {_shape(want)}")
        return (f"{at}the checkpoint tensors {group.keys[0]} ... ({len(group.keys)}) make {name} of shape "
                f"{_shape(got)}; {cls} wants {_shape(want)} (tensors missing or of the wrong shape)")

    # ------------------------------------------------------------------ writing
    def revert(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameters by model name -> the checkpoint's own tensors, by the
        reverse of the conversions this checkpoint was read with
        (transformers' ``revert_weight_conversion``, as ``save_pretrained``).
        ``tensors`` must hold whole groups (:meth:`groups_of`). Every tensor
        returned owns its memory, contiguous (safetensors refuses views that share it)."""
        from transformers.core_model_loading import revert_weight_conversion

        if not self.conversions:
            return dict(tensors)
        self.model._weight_conversions = self.conversions
        out = revert_weight_conversion(self.model, dict(tensors))
        return {k: _own(v) for k, v in out.items()}

    def revert_rows(self, tensors: dict[str, Tensor], start: int) -> dict[str, tuple[Tensor, int]]:
        """:meth:`revert` for rows ``start:`` of 3-D parameters (a group of
        experts): ``{checkpoint name: (tensor, first row)}``. A checkpoint that
        keeps one tensor per expert gets those experts' tensors, renamed to
        their own indices (first row 0); one that keeps the fused tensor gets
        rows of it, to be written from ``first row`` on."""
        full = self.revert({n: torch.empty(self.wanted[n][0], dtype=self.wanted[n][1], device="meta") for n in tensors})
        # where the expert index sits in each per-expert checkpoint name: the number that varies
        varying: dict[str, int] = {}
        numbers: dict[str, set] = {}
        for k in full:
            t, nums = _template(k)
            numbers.setdefault(t, set()).add(nums)
        for t, seen in numbers.items():
            pos = [j for j in range(len(next(iter(seen)))) if len({s[j] for s in seen}) > 1]
            if len(pos) == 1:
                varying[t] = pos[0]
        out: dict[str, tuple[Tensor, int]] = {}
        for k, v in self.revert(tensors).items():
            t, nums = _template(k)
            if t in varying:
                j = varying[t]
                out[_fill(t, nums[:j] + (nums[j] + start,) + nums[j + 1:])] = (v, 0)
            elif k in full and tuple(full[k].shape[1:]) == tuple(v.shape[1:]):
                out[k] = (v, start)
            else:
                raise D2PruneError(f"{k} cannot be written back one group of experts at a time")
        return out

    def reverted_names(self, names: Iterable[str]) -> list[str]:
        """The checkpoint names :meth:`revert` gives ``names`` (worked out on the meta device)."""
        return list(self.revert({n: torch.empty(self.wanted[n][0], dtype=self.wanted[n][1], device="meta")
                                 for n in names}))

    def written_as_read(self, names: Iterable[str]) -> bool:
        """``names`` are written back as they are (no conversion, same names):
        a finished block's shard can be linked into the output as it is."""
        names = list(names)
        return (all(g.converter is None for g in self.groups_of(names))
                and sorted(self.reverted_names(names)) == sorted(names))


def _own(t: Tensor) -> Tensor:
    """``t`` contiguous and alone in its storage (a view split off a fused tensor is copied)."""
    if t.device.type == "meta":
        return t
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)

