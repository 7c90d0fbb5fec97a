"""Elo ratings for snapshot-vs-snapshot comparisons (the paper's figure 2).

Crowdworkers (or a judge model) compare responses from two model snapshots;
each comparison is one pairwise outcome. Ratings follow the Bradley-Terry
model on the paper's Elo scale:

  P(i beats j) = 1 / (1 + 10 ** ((E_j - E_i) / 400))

so a 100-point gap means the higher-rated snapshot wins about 64% of the time.

A comparison is a tuple ``(player_i, player_j, outcome)`` or
``(player_i, player_j, outcome, weight)``. ``outcome`` is the probability (or
fraction of games) that ``player_i`` beat ``player_j``: 1, 0, 0.5 for a tie, or
a judge's soft preference p in [0, 1]. ``weight`` (default 1) counts the
comparison as that many games. A soft outcome p counts exactly like p wins
and (1 - p) losses, so ``(a, b, 0.7)`` and the pair ``(a, b, 1, 0.7)``,
``(a, b, 0, 0.3)`` give the same fit.

Centring: ratings are only defined up to a shared offset. ``anchor=FIRST``
(the default) pins the first player (first in ``players`` or, without it,
first to appear in the comparisons) at 0; ``anchor=<player>`` pins that player
at 0; ``anchor=None`` makes the ratings average 0.

Everything here is numpy and matplotlib (Agg canvas); no JAX.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

ELO_SCALE = 400.0
_NAT = math.log(10.0) / ELO_SCALE  # natural log-odds per Elo point


class _First:
  """Sentinel: anchor the first player at Elo 0."""

  def __repr__(self) -> str:
    return "FIRST"


FIRST = _First()

Interval = Tuple[float, float, float]
Ratings = Mapping[Hashable, Union[float, Interval]]


def win_probability(elo_i: float, elo_j: float) -> float:
  """P(i beats j) on the Elo scale: 1 / (1 + 10^((E_j - E_i) / 400))."""
  return 1.0 / (1.0 + 10.0 ** ((elo_j - elo_i) / ELO_SCALE))


def _parse(comparisons: Sequence[Sequence[Any]],
           players: Optional[Sequence[Hashable]]):
  """Validates comparisons; returns (players, i_idx, j_idx, outcomes, weights)."""
  comparisons = list(comparisons)
  if players is None:
    order: Dict[Hashable, None] = {}
    for k, c in enumerate(comparisons):
      if len(c) not in (3, 4):
        raise ValueError(f"comparison {k} must be (player_i, player_j, outcome[, weight]); "
                         f"got {c!r}")
      order.setdefault(c[0], None)
      order.setdefault(c[1], None)
    players = list(order)
  else:
    players = list(players)
    if len(set(players)) != len(players):
      raise ValueError(f"players contains duplicates: {players!r}")
  if len(players) < 2:
    raise ValueError(f"Elo needs at least two snapshots to compare; got {len(players)} "
                     f"({players!r})")
  index = {p: n for n, p in enumerate(players)}
  n = len(comparisons)
  ii = np.zeros(n, np.int64)
  jj = np.zeros(n, np.int64)
  y = np.zeros(n, np.float64)
  w = np.ones(n, np.float64)
  for k, c in enumerate(comparisons):
    if len(c) not in (3, 4):
      raise ValueError(f"comparison {k} must be (player_i, player_j, outcome[, weight]); "
                       f"got {c!r}")
    a, b = c[0], c[1]
    for p in (a, b):
      if p not in index:
        raise ValueError(f"comparison {k} names player {p!r}, not in players {players!r}")
    if a == b:
      raise ValueError(f"comparison {k} compares player {a!r} with itself")
    out = float(c[2])
    if not (0.0 <= out <= 1.0):  # also rejects NaN
      raise ValueError(f"comparison {k}: outcome {c[2]!r} is outside [0, 1]")
    wt = float(c[3]) if len(c) == 4 else 1.0
    if not (wt >= 0.0 and math.isfinite(wt)):
      raise ValueError(f"comparison {k}: weight {c[3]!r} must be finite and >= 0")
    ii[k], jj[k], y[k], w[k] = index[a], index[b], out, wt
  return players, ii, jj, y, w


def _resolve_anchor(players: List[Hashable], anchor: Any) -> Optional[int]:
  if anchor is None:
    return None
  if anchor is FIRST:
    return 0
  if anchor not in players:
    raise ValueError(f"anchor {anchor!r} is not one of the players {players!r}")
  return players.index(anchor)


def _newton(n_players: int, ii: np.ndarray, jj: np.ndarray, y: np.ndarray,
            w: np.ndarray, l2: float, iters: int, tol: float) -> np.ndarray:
  """Maximises sum w[y log s(d) + (1-y) log s(-d)] - l2 |theta|^2, d = theta_i - theta_j.

  theta is in natural log-odds units; returns theta.
  """
  theta = np.zeros(n_players)
  ridge = 2.0 * max(l2, 1e-12) * np.eye(n_players)
  for _ in range(iters):
    d = theta[ii] - theta[jj]
    p = 0.5 * (1.0 + np.tanh(0.5 * d))  # stable sigmoid
    r = w * (y - p)
    grad = np.bincount(ii, r, n_players) - np.bincount(jj, r, n_players)
    grad -= 2.0 * l2 * theta
    c = w * p * (1.0 - p)
    hess = np.zeros((n_players, n_players))  # negative Hessian (a weighted graph Laplacian)
    np.add.at(hess, (ii, jj), -c)
    np.add.at(hess, (jj, ii), -c)
    deg = np.bincount(ii, c, n_players) + np.bincount(jj, c, n_players)
    hess[np.diag_indices(n_players)] += deg
    step = np.linalg.solve(hess + ridge, grad)
    # Damp very large steps (near-separable data) so the iteration stays stable.
    big = np.max(np.abs(step))
    if big > 5.0:
      step *= 5.0 / big
    theta += step
    if np.max(np.abs(step)) < tol:
      break
  return theta


def _fit_arrays(players, ii, jj, y, w, anchor_idx, l2, iters, tol) -> np.ndarray:
  theta = _newton(len(players), ii, jj, y, w, l2, iters, tol)
  elo = theta / _NAT
  if anchor_idx is None:
    elo = elo - elo.mean()
  else:
    elo = elo - elo[anchor_idx]
  return elo


def fit_elo(comparisons: Sequence[Sequence[Any]],
            players: Optional[Sequence[Hashable]] = None,
            anchor: Any = FIRST,
            l2: float = 1e-6,
            iters: int = 100,
            tol: float = 1e-10) -> Dict[Hashable, float]:
  """Bradley-Terry maximum-likelihood Elo ratings.

  Args:
    comparisons: ``(player_i, player_j, outcome[, weight])`` tuples; outcome
      in [0, 1] is the probability/fraction that player_i beat player_j.
    players: the players to rate, in order (default: order of first
      appearance). A listed player with no comparisons gets the same rating
      as the L2 centre (0 before centring).
    anchor: ``FIRST`` (default) pins the first player at 0; a player name pins
      that player at 0; ``None`` centres the ratings on mean 0.
    l2: L2 penalty on the ratings in natural log-odds units (a tiny value for
      identifiability; data with a player who never loses or never wins then
      gives a large but finite rating).
    iters: maximum Newton iterations.
    tol: stop once the largest Newton step (log-odds units) is below this.

  Returns:
    ``{player: elo}`` in player order.

  Raises:
    ValueError: fewer than two players, an outcome outside [0, 1] (the
      message names the comparison index), an unknown player, a self-comparison
      or a bad anchor.
  """
  players, ii, jj, y, w = _parse(comparisons, players)
  anchor_idx = _resolve_anchor(players, anchor)
  elo = _fit_arrays(players, ii, jj, y, w, anchor_idx, l2, iters, tol)
  return {p: float(e) for p, e in zip(players, elo)}


def _components(n_players: int, ii: np.ndarray, jj: np.ndarray, w: np.ndarray
                ) -> List[List[int]]:
  """Connected components of the comparison graph (an edge per comparison of weight > 0),
  each a sorted list of player indices, in order of their smallest index."""
  adj = np.zeros((n_players, n_players), bool)
  keep = w > 0
  adj[ii[keep], jj[keep]] = True
  adj |= adj.T
  label = np.full(n_players, -1)
  comps = []
  for start in range(n_players):
    if label[start] >= 0:
      continue
    reach = np.zeros(n_players, bool)
    reach[start] = True
    while True:
      grown = reach | adj[reach].any(axis=0)
      if (grown == reach).all():
        break
      reach = grown
    label[reach] = len(comps)
    comps.append([int(t) for t in np.flatnonzero(reach)])
  return comps


def bootstrap_elo(comparisons: Sequence[Sequence[Any]],
                  n_boot: int = 200,
                  seed: int = 0,
                  ci: float = 0.95,
                  players: Optional[Sequence[Hashable]] = None,
                  anchor: Any = FIRST,
                  l2: float = 1e-6,
                  iters: int = 100,
                  groups: Optional[Sequence[Hashable]] = None) -> Dict[Hashable, Interval]:
  """Elo ratings with (cluster) bootstrap percentile confidence intervals.

  Resamples with replacement ``n_boot`` times (numpy ``default_rng(seed)``), refits
  each resample with the same players, anchor and L2, and takes the ``(1 - ci)/2`` and
  ``(1 + ci)/2`` percentiles of each player's rating. The point estimate is the fit on
  the full data.

  What is resampled is the group: ``groups`` gives one hashable key per comparison
  (e.g. the prompt id), and each resample draws as many groups as there are, with
  replacement, keeping all comparisons of a drawn group together (a cluster bootstrap).
  Comparisons that share a prompt (every pair of players judged on it, both orders,
  several samples) are correlated; resampling them one by one treats them as
  independent and gives intervals that are too narrow. Without ``groups`` every
  comparison is its own group (the plain bootstrap; ``groups=range(n)`` gives the same
  numbers).

  A resample whose comparisons do not connect every player (a player drawn in no
  comparison, or two sets of players with no comparison between them) leaves some
  ratings arbitrary (set by the L2 prior, not the data); it is discarded and another
  drawn, so the intervals are those of the bootstrap conditioned on a rateable
  resample. That is close to the unconditioned one only while such resamples are rare:
  once as many have been discarded as ``n_boot``, ValueError (too few groups for an
  interval).

  Players whose comparisons fall apart into disconnected sets in the full data (no
  chain of comparisons from one set to the other, counting only weight > 0) are a
  ValueError naming the sets rather than a warning: an Elo difference across them is
  fixed by the L2 prior alone, and a report table would show it as if it were measured.
  A listed player with no comparison at all is such a set; leave it out of ``players``.

  Args:
    comparisons, players, anchor, l2, iters: as for ``fit_elo``.
    n_boot: resamples kept (>= 1).
    seed: seed of the resampling.
    ci: central coverage of the interval, in (0, 1).
    groups: None, or one hashable key per comparison; comparisons with equal keys are
      resampled together.

  Returns:
    ``{player: (elo, lo, hi)}`` in player order. The anchor player's interval
    is (0, 0, 0) by construction; the others are relative to it.

  Raises:
    ValueError: as for ``fit_elo``; ci or n_boot out of range; ``groups`` of another
      length than ``comparisons`` or with an unhashable key; disconnected players; too
      many unrateable resamples.
  """
  if not 0.0 < ci < 1.0:
    raise ValueError(f"ci must be in (0, 1); got {ci}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1; got {n_boot}")
  comparisons = list(comparisons)
  n = len(comparisons)
  if groups is None:
    gid = np.arange(n)
  else:
    groups = list(groups)
    if len(groups) != n:
      raise ValueError(f"bootstrap_elo: groups has {len(groups)} keys for {n} comparisons")
    keys: Dict[Hashable, int] = {}
    gid = np.zeros(n, np.int64)
    for k, g in enumerate(groups):
      try:
        gid[k] = keys.setdefault(g, len(keys))
      except TypeError:
        raise ValueError(f"bootstrap_elo: groups[{k}] = {g!r} is not hashable") from None
  players, ii, jj, y, w = _parse(comparisons, players)
  anchor_idx = _resolve_anchor(players, anchor)
  comps = _components(len(players), ii, jj, w)
  if len(comps) > 1:
    sets = " | ".join("{" + ", ".join(repr(players[t]) for t in c) + "}" for c in comps)
    raise ValueError(f"bootstrap_elo: no chain of comparisons links these sets of players, "
                     f"so Elo across them is undefined: {sets}")
  tol = 1e-8
  point = _fit_arrays(players, ii, jj, y, w, anchor_idx, l2, iters, tol)
  rng = np.random.default_rng(seed)
  n_groups = int(gid.max()) + 1
  order = np.argsort(gid, kind="stable")  # comparisons of group g: order[start[g]:][:size[g]]
  size = np.bincount(gid, minlength=n_groups)
  start = np.cumsum(size) - size
  boots = np.zeros((n_boot, len(players)))
  b = discarded = 0
  while b < n_boot:
    draw = rng.integers(0, n_groups, size=n_groups)
    sz = size[draw]
    k = order[np.repeat(start[draw] - (np.cumsum(sz) - sz), sz) + np.arange(int(sz.sum()))]
    if len(_components(len(players), ii[k], jj[k], w[k])) > 1:
      discarded += 1
      if discarded >= n_boot:
        raise ValueError(f"bootstrap_elo: {discarded} of {b + discarded} resamples left some "
                         f"players with no chain of comparisons to the others; too few "
                         f"{'groups' if groups is not None else 'comparisons'} "
                         f"({n_groups}) for a bootstrap interval")
      continue
    boots[b] = _fit_arrays(players, ii[k], jj[k], y[k], w[k], anchor_idx, l2, iters, tol)
    b += 1
  lo = np.percentile(boots, 100.0 * (1.0 - ci) / 2.0, axis=0)
  hi = np.percentile(boots, 100.0 * (1.0 + ci) / 2.0, axis=0)
  return {p: (float(point[t]), float(lo[t]), float(hi[t])) for t, p in enumerate(players)}


def _split(value: Union[float, Sequence[float]]) -> Tuple[float, Optional[float], Optional[float]]:
  if isinstance(value, (tuple, list, np.ndarray)):
    if len(value) != 3:
      raise ValueError(f"a rating is a number or (elo, lo, hi); got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])
  return float(value), None, None


def format_rating(value: float, precision: int = 0, signed: bool = False) -> str:
  """`value` with `precision` decimals (a '+' in front of positive ones when `signed`); a
  value that rounds to zero is written 0, never -0."""
  v = round(float(value), precision) + 0.0   # -0.0 + 0.0 is 0.0
  return f"{v:+.{precision}f}" if signed else f"{v:.{precision}f}"


def elo_table(ratings: Union[Ratings, Mapping[str, Ratings]], precision: int = 0) -> str:
  """Renders ratings as a plain-text table.

  Args:
    ratings: ``{player: elo}`` or ``{player: (elo, lo, hi)}`` for one column,
      or ``{column_name: ratings}`` (e.g. ``{"helpful": h, "harmless": r}``)
      for several columns. Rows follow the first column's player order; a
      player missing from a column shows "-".
    precision: decimals shown.

  Returns:
    The table, one line per player, with a header line.
  """
  if ratings and all(isinstance(v, Mapping) for v in ratings.values()):
    columns = dict(ratings)
  else:
    columns = {"elo": ratings}
  rows: List[Hashable] = []
  for col in columns.values():
    for p in col:
      if p not in rows:
        rows.append(p)

  def cell(col: Ratings, p: Hashable) -> str:
    if p not in col:
      return "-"
    e, lo, hi = _split(col[p])
    if lo is None:
      return format_rating(e, precision)
    return (f"{format_rating(e, precision)} [{format_rating(lo, precision)}, "
            f"{format_rating(hi, precision)}]")

  header = ["snapshot"] + [str(c) for c in columns]
  body = [[str(p)] + [cell(col, p) for col in columns.values()] for p in rows]
  widths = [max(len(r[k]) for r in [header] + body) for k in range(len(header))]
  lines = ["  ".join(h.ljust(widths[0]) if k == 0 else h.rjust(widths[k])
                     for k, h in enumerate(header))]
  lines.append("  ".join("-" * wd for wd in widths))
  for r in body:
    lines.append("  ".join(v.ljust(widths[0]) if k == 0 else v.rjust(widths[k])
                           for k, v in enumerate(r)))
  return "\n".join(lines)


def frontier_plot(help_elo: Ratings, harm_elo: Ratings, path: str,
                  labels: Optional[Union[Sequence[str], Mapping[Hashable, str]]] = None,
                  title: str = "Harmlessness vs helpfulness Elo") -> str:
  """Writes a PNG of harmlessness Elo against helpfulness Elo (figure 2).

  One point per snapshot, in ``help_elo``'s order, joined by a line in that
  (training) order. Ratings given as ``(elo, lo, hi)`` draw asymmetric error
  bars on that axis.

  Args:
    help_elo: ``{snapshot: elo}`` or ``{snapshot: (elo, lo, hi)}`` (x axis).
    harm_elo: the same for harmlessness (y axis); must cover every snapshot.
    path: output PNG path (parent folders are created).
    labels: annotations per point: a sequence in snapshot order or a mapping
      snapshot -> label (default: the snapshot names).
    title: the plot title.

  Returns:
    ``path``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  snaps = list(help_elo)
  if len(snaps) < 1:
    raise ValueError("frontier_plot needs at least one snapshot")
  missing = [s for s in snaps if s not in harm_elo]
  if missing:
    raise ValueError(f"harm_elo lacks snapshots {missing!r}")
  xs = [_split(help_elo[s]) for s in snaps]
  ys = [_split(harm_elo[s]) for s in snaps]
  if labels is None:
    names = [str(s) for s in snaps]
  elif isinstance(labels, Mapping):
    names = [str(labels.get(s, s)) for s in snaps]
  else:
    names = [str(l) for l in labels]
    if len(names) != len(snaps):
      raise ValueError(f"{len(names)} labels for {len(snaps)} snapshots")

  x = np.array([v[0] for v in xs])
  yv = np.array([v[0] for v in ys])

  def err(vals, centre):
    if any(v[1] is None for v in vals):
      return None
    lo = np.array([v[1] for v in vals])
    hi = np.array([v[2] for v in vals])
    return np.stack([np.maximum(centre - lo, 0.0), np.maximum(hi - centre, 0.0)])

  fig = Figure(figsize=(6, 5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(x, yv, "-", color="tab:blue", alpha=0.6, zorder=1)
  ax.errorbar(x, yv, xerr=err(xs, x), yerr=err(ys, yv), fmt="o", color="tab:blue",
              ecolor="tab:gray", capsize=3, zorder=2)
  for xi, yi, name in zip(x, yv, names):
    ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
  ax.set_xlabel("Helpfulness Elo")
  ax.set_ylabel("Harmlessness Elo")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def elo_vs_step_plot(by_kind: Mapping[str, Ratings], steps: Mapping[Hashable, int], path: str,
                     title: str = "Elo against RL training",
                     xlabel: str = "RL iteration (PPO updates)") -> str:
  """Writes a PNG of each kind's Elo against the RL step of the snapshots (the paper's
  figure 8: helpfulness and harmlessness Elo along RL training), one panel per kind.

  Args:
    by_kind: ``{kind: {snapshot: elo or (elo, lo, hi)}}``, e.g. kinds 'helpfulness' and
      'harmlessness'; an interval draws an error bar.
    steps: ``{snapshot: step}`` of the snapshots to draw (others in by_kind are left
      out); a panel draws those of its snapshots that have a rating, in step order.
    path: output PNG path (parent folders are created).
    title, xlabel: the figure title and the x axis label.

  Returns:
    ``path``. ValueError when no panel has a snapshot to draw.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = []
  for kind, ratings in by_kind.items():
    snaps = sorted((s for s in ratings if s in steps), key=lambda s: steps[s])
    if snaps:
      panels.append((kind, snaps, ratings))
  if not panels:
    raise ValueError("elo_vs_step_plot: no snapshot with both a step and a rating")
  fig = Figure(figsize=(5 * len(panels), 4), dpi=100)
  FigureCanvasAgg(fig)
  for k, (kind, snaps, ratings) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    vals = [_split(ratings[s]) for s in snaps]
    x = np.array([steps[s] for s in snaps], dtype=float)
    y = np.array([v[0] for v in vals])
    yerr = None
    if all(v[1] is not None for v in vals):
      yerr = np.stack([np.maximum(y - np.array([v[1] for v in vals]), 0.0),
                       np.maximum(np.array([v[2] for v in vals]) - y, 0.0)])
    ax.errorbar(x, y, yerr=yerr, fmt="o-", color="tab:blue", ecolor="tab:gray", capsize=3)
    for xi, yi, s in zip(x, y, snaps):
      ax.annotate(str(s), (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(x=0.15)   # room for the last point's label
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{kind.capitalize()} Elo")
    ax.grid(True, alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path
