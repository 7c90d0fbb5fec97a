"""Tests for cai_jax.report: Bradley-Terry Elo fitting, bootstrap intervals, table, plot."""

import itertools
import math

import numpy as np
import pytest

from cai_jax import report

PLANTED = {"s0": -200.0, "s1": -50.0, "s2": 0.0, "s3": 120.0, "s4": 300.0}


def _simulate(ratings, n_games, seed=0):
  """Random pairs with hard win/loss outcomes drawn from the Elo model."""
  rng = np.random.default_rng(seed)
  names = list(ratings)
  games = []
  for _ in range(n_games):
    i, j = rng.choice(len(names), size=2, replace=False)
    a, b = names[i], names[j]
    p = report.win_probability(ratings[a], ratings[b])
    games.append((a, b, float(rng.random() < p)))
  return games


@pytest.fixture(scope="module")
def games():
  return _simulate(PLANTED, 4000, seed=0)


def _centred(d):
  m = np.mean(list(d.values()))
  return {k: v - m for k, v in d.items()}


def test_win_probability_scale():
  assert report.win_probability(0.0, 0.0) == pytest.approx(0.5)
  assert report.win_probability(400.0, 0.0) == pytest.approx(10.0 / 11.0)
  assert report.win_probability(100.0, 0.0) == pytest.approx(0.64, abs=0.005)


def test_fit_recovers_planted_ratings(games):
  fit = report.fit_elo(games, players=list(PLANTED), anchor=None)
  truth = _centred(PLANTED)
  assert abs(np.mean(list(fit.values()))) < 1e-6
  for p in PLANTED:
    assert abs(fit[p] - truth[p]) < 30.0, (p, fit[p], truth[p])
  # Order is recovered too.
  assert sorted(fit, key=fit.get) == list(PLANTED)


def test_fit_is_the_likelihood_maximum(games):
  """Moving any rating away from the fit lowers the log-likelihood."""
  fit = report.fit_elo(games, anchor=None)

  def loglik(r):
    s = 0.0
    for a, b, y in games:
      p = report.win_probability(r[a], r[b])
      s += y * math.log(p) + (1 - y) * math.log(1 - p)
    return s

  best = loglik(fit)
  for p in fit:
    for delta in (-5.0, 5.0):
      moved = dict(fit)
      moved[p] += delta
      assert loglik(moved) < best


def test_bootstrap_intervals_cover_truth(games):
  boot = report.bootstrap_elo(games, n_boot=200, seed=0, ci=0.95, players=list(PLANTED),
                              anchor="s2")
  truth = {k: v - PLANTED["s2"] for k, v in PLANTED.items()}
  assert boot["s2"] == (0.0, 0.0, 0.0)
  for p, (e, lo, hi) in boot.items():
    assert lo <= e <= hi
    assert lo <= truth[p] <= hi, (p, lo, truth[p], hi)
    assert abs(e - truth[p]) < 30.0
    if p != "s2":
      assert 5.0 < hi - lo < 120.0  # a real interval, neither degenerate nor vacuous
  # Point estimate equals the plain fit.
  fit = report.fit_elo(games, players=list(PLANTED), anchor="s2")
  for p in PLANTED:
    assert boot[p][0] == pytest.approx(fit[p], abs=1e-4)


def test_bootstrap_deterministic_and_narrows_with_more_data():
  small = _simulate(PLANTED, 300, seed=1)
  a = report.bootstrap_elo(small, n_boot=50, seed=3)
  b = report.bootstrap_elo(small, n_boot=50, seed=3)
  assert a == b
  big = _simulate(PLANTED, 3000, seed=1)
  c = report.bootstrap_elo(big, n_boot=50, seed=3)
  width = lambda r, p: r[p][2] - r[p][1]
  assert width(c, "s4") < width(a, "s4")


# bootstrap_elo(_simulate(PLANTED, 300, seed=1), n_boot=50, seed=3) before groups existed.
PLAIN_BOOTSTRAP = {
    "s1": (0.0, 0.0, 0.0),
    "s2": (12.334932656300055, -58.37787877923502, 67.70889444128282),
    "s3": (172.47815918991122, 81.9607546008816, 275.2575170621211),
    "s4": (370.5736296822266, 274.33553490086763, 465.24508291705206),
    "s0": (-233.15664919851582, -373.4031644536319, -145.72032575984508)}


def test_bootstrap_default_groups_are_the_plain_bootstrap():
  games = _simulate(PLANTED, 300, seed=1)
  plain = report.bootstrap_elo(games, n_boot=50, seed=3)
  assert list(plain) == list(PLAIN_BOOTSTRAP)
  for p, want in PLAIN_BOOTSTRAP.items():
    assert plain[p] == pytest.approx(want, abs=1e-9)
  # One group per comparison is the same draw, to the bit, whatever the keys.
  assert report.bootstrap_elo(games, n_boot=50, seed=3, groups=range(len(games))) == plain
  assert report.bootstrap_elo(games, n_boot=50, seed=3,
                              groups=[f"g{k}" for k in range(len(games))]) == plain


TRUTH3 = {"a": 0.0, "b": 80.0, "c": -60.0}


def _clustered(truth, n_prompts, copies, redraw, rng):
  """Per prompt, each pair is judged `copies` times (orders alternating); each copy repeats
  the prompt's first outcome unless redrawn (probability `redraw`). Every outcome is
  marginally Bernoulli(win_probability), so the Elo fit is unbiased for `truth`, but the
  copies of a prompt are strongly correlated."""
  comps, groups = [], []
  for prompt in range(n_prompts):
    for a, b in itertools.combinations(truth, 2):
      p = report.win_probability(truth[a], truth[b])
      y0 = float(rng.random() < p)
      for c in range(copies):
        y = float(rng.random() < p) if rng.random() < redraw else y0
        comps.append((a, b, y) if c % 2 == 0 else (b, a, 1.0 - y))
        groups.append(f"prompt-{prompt}")
  return comps, groups


def test_cluster_bootstrap_is_wider_and_covers_where_the_plain_one_does_not():
  rng = np.random.default_rng(0)
  width = lambda r, p: r[p][2] - r[p][1]
  covered = {"plain": 0, "cluster": 0}
  ratios = []
  n_data = 40
  for r in range(n_data):
    comps, groups = _clustered(TRUTH3, 30, 4, 0.1, rng)
    plain = report.bootstrap_elo(comps, n_boot=50, seed=r, ci=0.8, players=list(TRUTH3))
    cluster = report.bootstrap_elo(comps, n_boot=50, seed=r, ci=0.8, players=list(TRUTH3),
                                   groups=groups)
    assert cluster["b"][0] == plain["b"][0]            # same point estimate
    for name, res in (("plain", plain), ("cluster", cluster)):
      covered[name] += sum(res[p][1] <= TRUTH3[p] <= res[p][2] for p in "bc")
    ratios += [width(cluster, p) / width(plain, p) for p in "bc"]
  coverage = {k: v / (2 * n_data) for k, v in covered.items()}
  # About 4 correlated copies per comparison: the plain interval is ~1/sqrt(3.4) as wide
  # as it should be and covers the truth about half the time instead of 80%.
  assert np.mean(ratios) > 1.6, ratios
  assert coverage["plain"] < 0.65, coverage
  assert 0.7 <= coverage["cluster"] <= 0.9, coverage


def test_bootstrap_redraws_a_resample_that_leaves_a_player_out():
  """c is compared (with a) on one prompt only; a resample without that prompt would rate
  c by the L2 prior (near a's 0). Such resamples are redrawn, so c - a is always the one
  prompt's logit."""
  comps = [("a", "c", 0.9), ("a", "b", 0.6)] + [("a", "b", 0.3), ("b", "a", 0.5)] * 3
  groups = ["p0", "p0"] + ["p1", "p1", "p2", "p2", "p3", "p3"]
  got = report.bootstrap_elo(comps, n_boot=100, seed=0, groups=groups)
  gap = -400.0 * math.log10(9.0)
  assert got["c"] == pytest.approx((gap, gap, gap), abs=0.5)
  assert got["b"][1] <= got["b"][0] <= got["b"][2] and got["b"][2] - got["b"][1] > 1.0


def test_bootstrap_refuses_data_too_sparse_to_resample():
  # A chain a-b-c-d-e, one link per group: a resample almost never holds every link.
  chain = [("a", "b", 0.6), ("b", "c", 0.6), ("c", "d", 0.6), ("d", "e", 0.6)]
  with pytest.raises(ValueError, match=r"^bootstrap_elo: 20 of \d+ resamples .*too few "
                                       r"groups \(4\) for a bootstrap interval$"):
    report.bootstrap_elo(chain, n_boot=20, groups=["p0", "p1", "p2", "p3"])
  with pytest.raises(ValueError, match=r"too few comparisons \(4\)"):
    report.bootstrap_elo(chain, n_boot=20)


def test_bootstrap_refuses_disconnected_players():
  comps = [("a", "b", 0.7), ("c", "d", 0.4), ("b", "a", 0.5), ("e", "c", 0.5),
           ("a", "e", 0.5, 0.0)]                      # a weight-0 comparison links nothing
  with pytest.raises(ValueError, match=r"^bootstrap_elo: no chain of comparisons links these "
                                       r"sets of players, so Elo across them is undefined: "
                                       r"\{'a', 'b'\} \| \{'c', 'd', 'e'\}$"):
    report.bootstrap_elo(comps, n_boot=5)
  with pytest.raises(ValueError, match=r"\{'a', 'b'\} \| \{'z'\}$"):
    report.bootstrap_elo([("a", "b", 0.7)], n_boot=5, players=["a", "b", "z"])


def test_bootstrap_group_errors():
  comps = [("a", "b", 0.7), ("b", "a", 0.4)]
  with pytest.raises(ValueError, match=r"^bootstrap_elo: groups has 1 keys for 2 comparisons$"):
    report.bootstrap_elo(comps, n_boot=5, groups=["p0"])
  with pytest.raises(ValueError, match=r"^bootstrap_elo: groups\[1\] = \['p'\] is not hashable$"):
    report.bootstrap_elo(comps, n_boot=5, groups=["p0", ["p"]])


def test_symmetric_outcomes_give_equal_ratings():
  games = []
  for a, b in [("x", "y"), ("y", "z"), ("x", "z")]:
    games += [(a, b, 1.0), (a, b, 0.0), (b, a, 0.5)]
  fit = report.fit_elo(games, anchor=None)
  for v in fit.values():
    assert v == pytest.approx(0.0, abs=1e-6)
  # A single tie between two players: equal.
  fit = report.fit_elo([("a", "b", 0.5)])
  assert fit == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-6)


def test_known_win_rate_gives_known_gap():
  """a beats b 75% of the time -> gap = 400 log10(3)."""
  games = [("a", "b", 1.0)] * 75 + [("a", "b", 0.0)] * 25
  fit = report.fit_elo(games, anchor="b")
  assert fit["a"] == pytest.approx(400.0 * math.log10(3.0), abs=0.1)
  assert fit["b"] == 0.0


def test_soft_outcomes_equal_expected_counts():
  soft = [("a", "b", 0.7), ("b", "c", 0.4), ("a", "c", 0.9), ("c", "a", 0.25)]
  counted = []
  for a, b, p in soft:
    counted += [(a, b, 1.0)] * int(round(p * 100)) + [(a, b, 0.0)] * int(round((1 - p) * 100))
  weighted = []
  for a, b, p in soft:
    weighted += [(a, b, 1.0, p), (a, b, 0.0, 1 - p)]
  f_soft = report.fit_elo([(a, b, p, 100.0) for a, b, p in soft])
  f_count = report.fit_elo(counted)
  f_weighted = report.fit_elo(weighted)
  f_soft1 = report.fit_elo(soft)
  for p in "abc":
    assert f_soft[p] == pytest.approx(f_count[p], abs=1e-3)
    assert f_soft1[p] == pytest.approx(f_weighted[p], abs=1e-3)
  assert f_soft["a"] > f_soft["b"]


def test_anchor_is_zero():
  games = _simulate(PLANTED, 500, seed=2)
  default = report.fit_elo(games, players=list(PLANTED))
  assert default["s0"] == 0.0
  for name in PLANTED:
    fit = report.fit_elo(games, players=list(PLANTED), anchor=name)
    assert fit[name] == 0.0
    # Anchoring only shifts the ratings.
    diffs = {p: fit[p] - default[p] for p in PLANTED}
    assert np.ptp(list(diffs.values())) < 1e-6
  mean0 = report.fit_elo(games, anchor=None)
  assert abs(sum(mean0.values())) < 1e-6
  # Without players=, the first player to appear is the anchor.
  first = games[0][0]
  assert report.fit_elo(games)[first] == 0.0


def test_errors():
  with pytest.raises(ValueError, match="at least two snapshots"):
    report.fit_elo([])
  with pytest.raises(ValueError, match="at least two snapshots"):
    report.fit_elo([], players=["only"])
  with pytest.raises(ValueError, match="at least two snapshots"):
    report.bootstrap_elo([], n_boot=2)
  with pytest.raises(ValueError, match=r"comparison 2.*outside \[0, 1\]"):
    report.fit_elo([("a", "b", 1.0), ("a", "b", 0.0), ("a", "b", 1.5)])
  with pytest.raises(ValueError, match=r"comparison 1.*outside"):
    report.fit_elo([("a", "b", 1.0), ("a", "b", -0.1)])
  with pytest.raises(ValueError, match=r"comparison 0.*outside"):
    report.fit_elo([("a", "b", float("nan"))])
  with pytest.raises(ValueError, match="not in players"):
    report.fit_elo([("a", "z", 1.0)], players=["a", "b"])
  with pytest.raises(ValueError, match="anchor"):
    report.fit_elo([("a", "b", 1.0)], anchor="q")
  with pytest.raises(ValueError, match="itself"):
    report.fit_elo([("a", "a", 1.0), ("a", "b", 1.0)])


def test_elo_table():
  boot = {"sl": (0.0, 0.0, 0.0), "rl-100": (85.4, 60.2, 110.9)}
  text = report.elo_table({"helpful": boot, "harmless": {"sl": 0.0, "rl-100": 140.0}})
  lines = text.splitlines()
  assert "helpful" in lines[0] and "harmless" in lines[0]
  assert len(lines) == 4
  assert lines[3].startswith("rl-100")
  assert "85 [60, 111]" in lines[3] and "140" in lines[3]
  single = report.elo_table({"a": 12.345, "b": -3.0}, precision=1)
  assert "12.3" in single and "-3.0" in single


def test_frontier_plot_writes_png(tmp_path, games):
  help_elo = report.bootstrap_elo(games, n_boot=20, seed=0)
  harm_elo = {p: (-e, -hi, -lo) for p, (e, lo, hi) in help_elo.items()}
  path = str(tmp_path / "sub" / "frontier.png")
  out = report.frontier_plot(help_elo, harm_elo, path, labels=[f"step {k}" for k in range(5)])
  assert out == path
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 5000
  # Plain ratings (no intervals) also plot.
  path2 = str(tmp_path / "plain.png")
  report.frontier_plot({"a": 0.0, "b": 50.0}, {"a": 0.0, "b": 20.0}, path2)
  with open(path2, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="lacks"):
    report.frontier_plot({"a": 0.0, "b": 1.0}, {"a": 0.0}, str(tmp_path / "x.png"))


def test_ratings_that_round_to_zero_are_written_0_not_minus_0():
  assert report.format_rating(-0.3) == "0" and report.format_rating(-0.3, signed=True) == "+0"
  assert report.format_rating(-0.6, signed=True) == "-1"
  assert report.format_rating(12.345, 1, signed=True) == "+12.3"
  table = report.elo_table({"a": (0.0, -0.2, 0.3), "b": (-0.4, -1.2, 0.1)})
  assert "-0" not in table and "0 [0, 0]" in table and "0 [-1, 0]" in table


def test_elo_vs_step_plot_draws_the_snapshots_with_a_step_and_refuses_none(tmp_path):
  by_kind = {"helpfulness": {"sl": (0.0, -5.0, 5.0), "rl-00002": (10.0, 2.0, 20.0), "x": 3.0},
             "harmlessness": {"sl": 0.0, "rl-00002": 30.0}}
  path = report.elo_vs_step_plot(by_kind, {"sl": 0, "rl-00002": 2}, str(tmp_path / "p" / "e.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no snapshot with both a step and a rating"):
    report.elo_vs_step_plot(by_kind, {"other": 1}, str(tmp_path / "f.png"))
  assert not (tmp_path / "f.png").exists()
