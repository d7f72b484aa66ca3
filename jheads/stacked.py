"""Per-head values kept stacked: one array per group of like heads, names as static metadata.

A multi_head of a thousand heads would otherwise return tens of thousands
of separate arrays from every step, and compile, run and merge them one by
one. Here each statistic of a group of like heads stays one `[G, ...]`
array through the step, psum, `metrics.merge` and checkpoints; the
per-head keys (`"auc/click"`, `head_losses["click"]`) appear only where a
user reads them, through the `Mapping` interface or `metrics.compute`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np


class HeadValues(Mapping):
  """One value per head, stacked: `values[i]` is head `names[i]`'s.

  A read-only mapping from head name to its value (an array slice), and a
  pytree with one leaf, so a step returns it as one output however many
  heads there are. `stacked` is the `[..., n_heads]` array itself.
  """

  def __init__(self, names: Sequence[str], values: Any):
    self.names = tuple(names)
    self.stacked = values
    self._index = {name: i for i, name in enumerate(self.names)}

  def __getitem__(self, name: str) -> Any:
    # The heads' axis is the last: values stacked over steps (`scan_steps`)
    # or devices (pmap) keep their leading axes.
    return self.stacked[..., self._index[name]]

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f"HeadValues({dict(self)!r})"


jax.tree_util.register_pytree_with_keys(
    HeadValues,
    lambda v: (((jax.tree_util.GetAttrKey("stacked"), v.stacked),), v.names),
    lambda names, children: HeadValues(names, children[0]),
    flatten_func=lambda v: ((v.stacked,), v.names),
)


class Group(Mapping):
  """The statistics of a group of like heads, each stacked over the group's heads.

  Attributes:
    names: the heads' names, in the group's order.
    stats: unsuffixed statistic key -> statistic whose leaves have a
      leading `[len(names)]` axis.
  """

  def __init__(self, names: Sequence[str], stats: Mapping[str, Any]):
    self.names = tuple(names)
    self.stats = dict(stats)

  def __getitem__(self, key: str) -> Any:
    return self.stats[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self.stats)

  def __len__(self) -> int:
    return len(self.stats)


jax.tree_util.register_pytree_with_keys(
    Group,
    lambda g: (
        tuple((jax.tree_util.DictKey(k), g.stats[k]) for k in g.stats),
        (g.names, tuple(g.stats)),
    ),
    lambda aux, children: Group(aux[0], dict(zip(aux[1], children))),
    flatten_func=lambda g: (tuple(g.stats[k] for k in g.stats), (g.names, tuple(g.stats))),
)


class GroupedStats(Mapping):
  """A multi_head's metric statistics, stacked per group of like heads.

  Reads as the flat dict it stands for (`stats["auc/click"]`, `keys()`,
  `items()`), key order as a flat multi_head dict has it: every
  `loss/<head>` first, then each head's statistics in head order. As a
  pytree it holds one leaf per statistic per group (and one per `extras`
  entry), so it merges, psums and checkpoints as a few arrays.

  Attributes:
    groups: one `Group` per group of like heads; the statistic under key
      `"loss"` is each head's `loss/<head>`.
    extras: statistics that belong to no head (e.g. `regularization_loss`).
    order: head names in head order.
  """

  def __init__(
      self,
      groups: Sequence[Group],
      extras: Mapping[str, Any] | None = None,
      order: Sequence[str] | None = None,
      errors: Any = None,
  ):
    self.groups = tuple(groups)
    self.extras = dict(extras or {})
    # The value checks of the step that made them (`jheads.checks.StepErrors`),
    # raised when the statistics are read on the host.
    self.errors = errors
    self.order = tuple(order) if order is not None else tuple(
        name for g in self.groups for name in g.names
    )
    self._lookup = None

  def _keys(self) -> dict[str, tuple[int, int, str] | None]:
    """Flat key -> (group, position, unsuffixed key), or None for an extra."""
    if self._lookup is None:
      where = {name: (g, j) for g, group in enumerate(self.groups) for j, name in enumerate(group.names)}
      lookup: dict[str, Any] = {}
      for name in self.order:
        g, j = where[name]
        if "loss" in self.groups[g].stats:
          lookup[f"loss/{name}"] = (g, j, "loss")
      for name in self.order:
        g, j = where[name]
        for key in self.groups[g].stats:
          if key != "loss":
            lookup[f"{key}/{name}"] = (g, j, key)
      for key in self.extras:
        lookup[key] = None
      self._lookup = lookup
    return self._lookup

  def check(self) -> "GroupedStats":
    """Raises the failed value checks of the step that made these statistics, if any."""
    if self.errors is not None:
      self.errors.raise_if_failed()
    return self

  def __getitem__(self, key: str) -> Any:
    self.check()
    place = self._keys()[key]
    if place is None:
      return self.extras[key]
    g, j, stat_key = place
    return jax.tree.map(lambda x: x[j], self.groups[g].stats[stat_key])

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys())

  def __len__(self) -> int:
    return len(self._keys())

  def with_extras(self, **extras: Any) -> "GroupedStats":
    """The same statistics plus statistics that belong to no head."""
    return GroupedStats(self.groups, {**self.extras, **extras}, self.order, self.errors)

  def with_errors(self, errors: Any) -> "GroupedStats":
    """The same statistics, carrying a step's value checks."""
    return GroupedStats(self.groups, self.extras, self.order, errors)

  def results(self) -> dict[str, Any]:
    """Every metric value, keyed as the flat dict: one vectorized `result()` per statistic and group."""
    self.check()
    values: dict[str, Any] = {}
    per_group = [
        {key: np.asarray(stat.result()) if _on_host(stat) else stat.result() for key, stat in group.stats.items()}
        for group in self.groups
    ]
    for key, place in self._keys().items():
      if place is None:
        values[key] = self.extras[key].result()
      else:
        g, j, stat_key = place
        values[key] = per_group[g][stat_key][j]
    return values

  def __repr__(self) -> str:
    return f"GroupedStats({len(self.groups)} groups, {len(self)} keys)"


def _on_host(stat: Any) -> bool:
  return all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stat))


def _flatten_grouped(s: GroupedStats):
  return (*s.groups, s.extras, s.errors), (len(s.groups), s.order)


def _unflatten_grouped(aux, children):
  n, order = aux
  return GroupedStats(children[:n], children[n], order, children[n + 1])


jax.tree_util.register_pytree_with_keys(
    GroupedStats,
    lambda s: (
        tuple(
            (key, child)
            for key, child in zip(
                (*(jax.tree_util.SequenceKey(i) for i in range(len(s.groups))),
                 jax.tree_util.GetAttrKey("extras"), jax.tree_util.GetAttrKey("errors")),
                _flatten_grouped(s)[0],
            )
        ),
        _flatten_grouped(s)[1],
    ),
    _unflatten_grouped,
    flatten_func=_flatten_grouped,
)
