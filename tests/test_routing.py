"""Routing / expert-load layer: spec validation, sampler invariants and exactness, the power-law
recipe, files, placement, capacity, and the closed forms against Monte Carlo.

Monte Carlo tolerances: ``4 * SE`` (SE = sample std / sqrt(draws); a false failure has
probability ~6e-5 per check) plus, for approximate closed forms, the approximation's bias bound
measured once with 4000-draw runs and recorded next to each check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moesim.errors import InputError
from moesim.routing import (
    _drain_highest,
    _fill_lowest,
    _spread_order,
    apply_capacity,
    balanced_loads,
    check_routing_files,
    distinct_experts,
    expected_distinct_experts,
    expected_drop_fraction,
    expected_loads,
    expected_max_load,
    expected_max_rank_load,
    expected_padded_rows,
    expert_capacity,
    imbalance,
    inclusion_probabilities,
    load_histogram,
    padded_rows,
    place_experts,
    power_law_loads,
    rank_expert_loads,
    sample_loads,
)
from moesim.spec.routing import RoutingSpec


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def spec(**kw) -> RoutingSpec:
    return RoutingSpec(**kw)


# ---------------------------------------------------------------------------------------------
# files used by several tests
# ---------------------------------------------------------------------------------------------

E8 = 8


@pytest.fixture
def hist_csv(tmp_path):
    h = np.array([[0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.05, 0.05],
                  [0.125] * 8])
    path = tmp_path / "hist.csv"
    np.savetxt(path, h, delimiter=",", header="layer shares", comments="# ")
    return str(path), h


@pytest.fixture
def trace_npz(tmp_path):
    g = rng(7)
    ids = np.stack([g.permutation(E8)[:2] for _ in range(3 * 50)]).reshape(3, 50, 2)
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=ids.astype(np.int16), gate=np.ones(ids.shape))
    return str(path), ids


def all_specs(hist_path: str, trace_path: str) -> list[RoutingSpec]:
    return [spec(), spec(distribution="uniform"), spec(distribution="power_law", alpha=1.01),
            spec(distribution="power_law", alpha=1.2), spec(distribution="zipf", s=1.0),
            spec(distribution="zipf", s=0.0), spec(distribution="dirichlet", alpha=0.3),
            spec(distribution="hot_experts", hot_experts=[0, 3], hot_fraction=0.4),
            spec(distribution="histogram", histogram_file=hist_path),
            spec(distribution="trace", trace_file=trace_path)]


# ---------------------------------------------------------------------------------------------
# RoutingSpec validation
# ---------------------------------------------------------------------------------------------

def test_spec_defaults_and_valid_blocks(hist_csv, trace_npz):
    s = spec()
    assert (s.distribution, s.seed, s.samples, s.overflow, s.placement) == \
        ("balanced", 0, 32, "dropless", "contiguous")
    assert len(all_specs(hist_csv[0], trace_npz[0])) == 10
    spec(capacity_factor=1.25, overflow="drop")
    spec(placement="eplb", redundant_experts=16)
    with pytest.raises(ValidationError):
        s.seed = 3  # frozen


@pytest.mark.parametrize("kw, field", [
    (dict(distribution="power_law", alpha=0.0), "alpha must be > 0"),
    (dict(distribution="power_law", alpha=-1.0), "alpha must be > 0"),
    (dict(distribution="power_law", alpha=1.0), "alpha must not be 1"),
    (dict(distribution="power_law"), "needs alpha"),
    (dict(distribution="dirichlet", alpha=0.0), "alpha must be > 0"),
    (dict(distribution="dirichlet"), "needs alpha"),
    (dict(distribution="zipf"), "needs s"),
    (dict(distribution="zipf", s=-0.5), "s must be >= 0"),
    (dict(distribution="zipf", s=1.0, alpha=1.2), "alpha is not used"),
    (dict(distribution="uniform", s=1.0), "s is not used"),
    (dict(distribution="balanced", trace_file="t.npz"), "trace_file is not used"),
    (dict(distribution="power_law", alpha=1.2, hot_fraction=0.5), "hot_fraction is not used"),
    (dict(distribution="hot_experts", hot_experts=[1]), "needs hot_fraction"),
    (dict(distribution="hot_experts", hot_fraction=0.5), "needs hot_experts"),
    (dict(distribution="hot_experts", hot_experts=[], hot_fraction=0.5), "hot_experts"),
    (dict(distribution="hot_experts", hot_experts=[1, 1], hot_fraction=0.5), "hot_experts"),
    (dict(distribution="hot_experts", hot_experts=[-1], hot_fraction=0.5), "hot_experts"),
    (dict(distribution="hot_experts", hot_experts=[1], hot_fraction=1.5), "hot_fraction"),
    (dict(distribution="histogram"), "needs histogram_file"),
    (dict(distribution="histogram", histogram_file=" "), "histogram_file"),
    (dict(distribution="trace"), "needs trace_file"),
    (dict(distribution="uniform", alpha=float("nan")), "alpha"),
    (dict(capacity_factor=0.0, overflow="drop"), "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0, overflow="drop"), "capacity_factor must be > 0"),
    (dict(capacity_factor=1.25), "capacity_factor has no effect"),
    (dict(overflow="drop"), "needs capacity_factor"),
    (dict(redundant_experts=8), "redundant_experts"),
    (dict(redundant_experts=-1, placement="eplb"), "redundant_experts"),
    (dict(samples=0), "samples"),
    (dict(seed=-1), "seed"),
    (dict(distribution="gaussian"), "distribution"),
    (dict(placement="random"), "placement"),
    (dict(overflow="spill"), "overflow"),
    (dict(temperature=1.0), "temperature"),
])
def test_spec_rejects_bad_input_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        RoutingSpec(**kw)


# ---------------------------------------------------------------------------------------------
# sampler invariants and determinism
# ---------------------------------------------------------------------------------------------

def _check_rows(loads: np.ndarray, T: int, E: int, k: int) -> None:
    assert loads.dtype == np.int64
    assert loads.shape[-1] == E
    assert np.all(loads.sum(axis=-1) == T * k)
    assert loads.min() >= 0 and loads.max() <= T


@pytest.mark.parametrize("T", [0, 1, 3, 50, 3000])
def test_every_distribution_keeps_sum_and_cap(T, hist_csv, trace_npz):
    for s in all_specs(hist_csv[0], trace_npz[0]):
        out = sample_loads(s, T, E8, 2, 4, rng(1))
        assert out.shape == (4, E8)
        _check_rows(out, T, E8, 2)
        many = sample_loads(s, T, E8, 2, 4, rng(1), num_samples=3)
        assert many.shape == (3, 4, E8)
        _check_rows(many, T, E8, 2)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 300), E=st.integers(1, 24), data=st.data())
def test_invariants_property(T, E, data):
    k = data.draw(st.integers(1, E))
    L = data.draw(st.integers(1, 3))
    choice = data.draw(st.sampled_from(["balanced", "uniform", "power_law", "zipf", "dirichlet",
                                        "hot_experts"]))
    kw: dict = {"distribution": choice, "seed": data.draw(st.integers(0, 5))}
    if choice == "power_law":
        kw["alpha"] = data.draw(st.sampled_from([0.5, 1.01, 1.2, 3.0]))
    elif choice == "zipf":
        kw["s"] = data.draw(st.floats(0, 3))
    elif choice == "dirichlet":
        kw["alpha"] = data.draw(st.sampled_from([0.05, 1.0, 20.0]))
    elif choice == "hot_experts":
        hot = sorted(data.draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=E)))
        H = len(hot)
        # feasible shares: each hot expert <= 1/k of the slots... and the cold ones likewise
        lo = max(0.0, 1 - (E - H) / k) if H < E else 1.0
        hi = max(lo, min(1.0, H / k))
        kw.update(hot_experts=hot, hot_fraction=data.draw(st.floats(lo, hi)))
    out = sample_loads(RoutingSpec(**kw), T, E, k, L, rng(data.draw(st.integers(0, 99))))
    assert out.shape == (L, E)
    _check_rows(out, T, E, k)


def test_k_equal_e_is_all_experts_every_token(hist_csv, trace_npz):
    for s in [spec(distribution="uniform"), spec(distribution="zipf", s=2.0),
              spec(distribution="dirichlet", alpha=0.1),
              spec(distribution="power_law", alpha=1.2)]:
        assert np.all(sample_loads(s, 7, 5, 5, 2, rng()) == 7)


def test_determinism_same_seed_same_arrays(hist_csv, trace_npz):
    for s in all_specs(hist_csv[0], trace_npz[0]):
        a = sample_loads(s, 40, E8, 2, 3, rng(11))
        b = sample_loads(s, 40, E8, 2, 3, rng(11))
        assert np.array_equal(a, b)
        if s.distribution != "balanced":
            c = sample_loads(s, 40, E8, 2, 3, rng(12))
            assert not np.array_equal(a, c), s.distribution


def test_balanced_is_deterministic_and_spread():
    b = balanced_loads(3, 16, 2)  # 6 slots over 16 experts
    assert b.sum() == 6 and b.max() == 1
    # one leftover slot per contiguous group of 16/6 experts, i.e. spread over ep ranks
    assert np.all(b.reshape(2, 8).sum(axis=1) == 3)
    assert np.array_equal(balanced_loads(10, 8, 2), np.full(8, 2) + np.array(
        [1, 0, 1, 0, 1, 0, 1, 0]))
    assert np.array_equal(sample_loads(spec(), 3, 16, 2, 2, rng(0))[1], b)


def test_zipf_popularity_is_stable_across_draws_and_set_by_seed():
    s = spec(distribution="zipf", s=1.2, seed=4)
    a = sample_loads(s, 2000, 32, 4, 3, rng(1))
    b = sample_loads(s, 2000, 32, 4, 3, rng(2))
    assert np.array_equal(a.argmax(axis=1), b.argmax(axis=1))  # same hot expert per layer
    c = sample_loads(spec(distribution="zipf", s=1.2, seed=5), 2000, 32, 4, 3, rng(1))
    assert not np.array_equal(a.argmax(axis=1), c.argmax(axis=1))


def test_sampler_rejects_bad_sizes():
    for args, field in [((-1, 8, 2, 1), "num_tokens"), ((4, 0, 1, 1), "num_experts"),
                        ((4, 8, 0, 1), "top_k"), ((4, 8, 9, 1), "top_k"),
                        ((4, 8, 2, 0), "num_layers"), ((4.5, 8, 2, 1), "num_tokens")]:
        with pytest.raises(ValueError, match=field):
            sample_loads(spec(distribution="uniform"), *args, rng())
    with pytest.raises(ValueError, match="num_samples"):
        sample_loads(spec(), 4, 8, 2, 1, rng(), num_samples=0)


# ---------------------------------------------------------------------------------------------
# the count sampler is exact (not an approximation of its per-token law)
# ---------------------------------------------------------------------------------------------

def test_uniform_matches_exact_moments():
    # Under uniform top-k each n_e ~ Binomial(T, k/E) exactly and
    # Cov(n_e, n_f) = T (k(k-1)/(E(E-1)) - (k/E)^2).
    T, E, k, S = 5, 8, 3, 20000
    x = sample_loads(spec(distribution="uniform"), T, E, k, 1, rng(3), num_samples=S)[:, 0]
    p = k / E
    assert abs(x.mean() - T * p) < 4 * math.sqrt(T * p * (1 - p) / (S * E))
    var = x.var(axis=0).mean()
    assert abs(var - T * p * (1 - p)) < 0.03 * T * p * (1 - p)  # SE of a variance ~ 1 %
    cov = np.cov(x[:, 0], x[:, 1])[0, 1]
    assert abs(cov - T * (k * (k - 1) / (E * (E - 1)) - p * p)) < 0.02
    # marginal pmf of one expert vs Binomial(T, p): max deviation within 4 SE
    from scipy import stats
    freq = np.bincount(x[:, 0], minlength=T + 1) / S
    pmf = stats.binom.pmf(np.arange(T + 1), T, p)
    assert np.all(np.abs(freq - pmf) < 4 * np.sqrt(pmf * (1 - pmf) / S) + 1e-9)


def test_zipf_matches_brute_force_rejective_sampling():
    # Per token: k i.i.d. draws from p, all redrawn until distinct (= P(S) ∝ Π p_e).
    E, k, T, S = 6, 3, 4, 20000
    s = spec(distribution="zipf", s=1.5, seed=2)
    x = sample_loads(s, T, E, k, 1, rng(5), num_samples=S)[:, 0]
    p = inclusion_probabilities(s, E, k, 1)[0]
    from moesim.routing import _zipf_weights
    w = _zipf_weights(E, 1.5, 2, 1)[0]
    w = w / w.sum()
    g = rng(6)
    brute = np.zeros((S, E), dtype=np.int64)
    for _ in range(T):
        todo = np.arange(S)
        picks = np.zeros((S, k), dtype=np.int64)
        while todo.size:
            d = g.choice(E, size=(todo.size, k), p=w)
            srt = np.sort(d, axis=1)
            ok = np.all(srt[:, 1:] != srt[:, :-1], axis=1)
            picks[todo[ok]] = d[ok]
            todo = todo[~ok]
        for j in range(k):
            np.add.at(brute, (np.arange(S), picks[:, j]), 1)
    se = np.sqrt(x.var(axis=0) / S + brute.var(axis=0) / S)
    assert np.all(np.abs(x.mean(axis=0) - brute.mean(axis=0)) < 4 * se)
    assert np.all(np.abs(x.mean(axis=0) - T * p) < 4 * np.sqrt(x.var(axis=0) / S))
    mx, mb = x.max(axis=1), brute.max(axis=1)
    assert abs(mx.mean() - mb.mean()) < 4 * math.sqrt(mx.var() / S + mb.var() / S)


def test_hot_experts_get_their_share():
    s = spec(distribution="hot_experts", hot_experts=[2, 5], hot_fraction=0.3)
    T, E, k, S = 20, 16, 4, 3000
    x = sample_loads(s, T, E, k, 2, rng(8), num_samples=S)
    share = x[..., [2, 5]].sum(axis=-1) / (T * k)
    assert abs(share.mean() - 0.3) < 4 * share.std() / math.sqrt(share.size)
    pi = inclusion_probabilities(s, E, k, 1)[0]
    assert np.allclose(pi[[2, 5]], 0.3 * k / 2) and np.isclose(pi.sum(), k)
    # a share the hot experts can only reach by taking every token: forced, exact
    full = sample_loads(spec(distribution="hot_experts", hot_experts=[1, 3], hot_fraction=1.0),
                        9, 8, 2, 1, rng())
    assert np.array_equal(full[0], np.array([0, 9, 0, 9, 0, 0, 0, 0]))


@pytest.mark.parametrize("kw, msg", [
    (dict(hot_experts=[8], hot_fraction=0.5), "hot_experts: expert id 8 does not exist"),
    (dict(hot_experts=[0], hot_fraction=0.9), "hot_fraction: 1 hot expert"),
    (dict(hot_experts=list(range(7)), hot_fraction=0.0), "hot_fraction: the 1 other"),
    (dict(hot_experts=list(range(8)), hot_fraction=0.5), "hot_fraction: every expert is hot"),
])
def test_hot_experts_infeasible_shares_are_input_errors(kw, msg):
    s = spec(distribution="hot_experts", **kw)
    with pytest.raises(InputError, match=msg):
        sample_loads(s, 10, 8, 2, 1, rng())
    with pytest.raises(ValueError, match=msg):
        check_routing_files(s, 8, 1, top_k=2)


def test_dirichlet_redraws_popularity_per_layer_and_draw():
    s = spec(distribution="dirichlet", alpha=0.2)
    x = sample_loads(s, 4000, 32, 2, 4, rng(1))
    assert len(set(x.argmax(axis=1))) > 1  # hot experts differ across layers
    assert imbalance(x).min() > 2.0  # alpha = 0.2 is strongly skewed
    flat = sample_loads(spec(distribution="dirichlet", alpha=1e4), 4000, 32, 2, 4, rng(1))
    assert imbalance(flat).max() < 1.3


# ---------------------------------------------------------------------------------------------
# power law: the reference README's recipe, step by step
# ---------------------------------------------------------------------------------------------

def _least_with_room(n: np.ndarray, ceiling: int) -> int:
    """The least-loaded expert below ``ceiling``; ties go in the sampler's spread order (bit-
    reversed ids), so residue units land on different EP ranks."""
    order = _spread_order(len(n))
    room = order[n[order] < ceiling]
    return int(room[np.argmin(n[room])])


def _most_loaded(n: np.ndarray) -> int:
    order = _spread_order(len(n))
    return int(order[np.argmax(n[order])])


def _recipe(T: int, E: int, k: int, a: float, g: np.random.Generator) -> np.ndarray:
    """The README recipe written out naively (direct inverse CDF, one-slot-at-a-time fixes)."""
    xmin, xmax = (1.0, 0.8 * T) if T * k > E else (0.01, 2.0)
    u = g.random(E)
    x = ((xmax ** (1 - a) - xmin ** (1 - a)) * u + xmin ** (1 - a)) ** (1 / (1 - a))
    assert np.all((x >= xmin * (1 - 1e-9)) & (x <= xmax * (1 + 1e-9)))  # bounded Pareto
    n = np.rint(x / x.sum() * T * k).astype(np.int64)
    over = int(np.clip(n - T, 0, None).sum())
    n = np.minimum(n, T)
    for _ in range(over):  # overflow, one slot at a time, to the least-loaded expert below T
        n[_least_with_room(n, T)] += 1
    delta = T * k - int(n.sum())
    for _ in range(max(delta, 0)):
        n[_least_with_room(n, T)] += 1
    for _ in range(max(-delta, 0)):
        n[_most_loaded(n)] -= 1
    return n


@pytest.mark.parametrize("T, E, k, a", [(64, 128, 8, 1.01), (512, 128, 8, 1.2),
                                        (1, 256, 8, 1.01), (4, 64, 8, 1.2), (100, 8, 4, 1.2),
                                        (30, 8, 6, 1.01), (2000, 64, 6, 0.5), (9, 16, 2, 3.0)])
def test_power_law_reproduces_readme_recipe(T, E, k, a):
    for seed in range(5):
        got = power_law_loads(T, E, k, a, rng(seed))
        want = _recipe(T, E, k, a, rng(seed))
        assert np.array_equal(got, want)
        _check_rows(got, T, E, k)
    # sample_loads draws layer after layer from the same stream
    two = sample_loads(spec(distribution="power_law", alpha=a), T, E, k, 2, rng(3))
    g = rng(3)
    assert np.array_equal(two[0], _recipe(T, E, k, a, g))
    assert np.array_equal(two[1], _recipe(T, E, k, a, g))


def test_power_law_cap_binds_and_moves_overflow():
    # E=8, k=4: a single expert draws far more than 1/k of the slots; capped at T exactly.
    hits = 0
    for seed in range(40):
        n = power_law_loads(100, 8, 4, 1.2, rng(seed))
        hits += int(n.max() == 100)
        _check_rows(n, 100, 8, 4)
    assert hits > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=12), st.integers(0, 80),
       st.integers(0, 25))
def test_water_fill_equals_one_at_a_time(counts, amount, ceiling):
    c = np.array(counts)
    naive = c.copy()
    placed = 0
    for _ in range(amount):
        if not (naive < ceiling).any():
            break
        naive[_least_with_room(naive, ceiling)] += 1
        placed += 1
    got, n = _fill_lowest(c, amount, ceiling)
    assert np.array_equal(got, naive) and n == placed
    drained = c.copy()
    take = min(amount, int(c.sum()))
    for _ in range(take):
        drained[_most_loaded(drained)] -= 1
    assert np.array_equal(_drain_highest(c, take), drained)


# ---------------------------------------------------------------------------------------------
# histogram and trace files
# ---------------------------------------------------------------------------------------------

def test_histogram_csv_npy_npz_and_cycling(tmp_path, hist_csv):
    path, h = hist_csv
    got = load_histogram(path, 8, 5)
    assert np.allclose(got, h[[0, 1, 0, 1, 0]])
    np.save(tmp_path / "h.npy", h[0])
    np.savez(tmp_path / "h.npz", histogram=h)
    assert np.allclose(load_histogram(str(tmp_path / "h.npy"), 8, 3), h[[0, 0, 0]])
    assert np.allclose(load_histogram(str(tmp_path / "h.npz"), 8, 2), h)
    s = spec(distribution="histogram", histogram_file=path)
    T, k, S = 200, 2, 400
    x = sample_loads(s, T, 8, k, 2, rng(2), num_samples=S)
    mean = x.mean(axis=0)
    se = x.std(axis=0) / math.sqrt(S) + 1e-9
    assert np.all(np.abs(mean - T * k * h) < 4 * se + 1e-9)
    assert np.allclose(expected_loads(s, T, 8, k, 2), T * k * h)


def test_histogram_fit_handles_forced_and_zero_shares(tmp_path):
    # k=2: a share of 1/2 means every token takes that expert; a share of 0 means none does.
    h = np.array([[0.5, 0.0, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0]])
    path = tmp_path / "edge.npy"
    np.save(path, h)
    s = spec(distribution="histogram", histogram_file=str(path))
    x = sample_loads(s, 50, 8, 2, 1, rng(1), num_samples=400)[:, 0]
    assert np.all(x[:, 0] == 50) and np.all(x[:, [1, 7]] == 0)
    _check_rows(x, 50, 8, 2)
    se = x.std(axis=0) / math.sqrt(400) + 1e-9
    assert np.all(np.abs(x.mean(axis=0) - 100 * h[0]) < 4 * se + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_weight_fit_reproduces_inclusion_probabilities(seed):
    from moesim.routing import _cps_inclusion, _fit_cps
    g = rng(seed)
    E = int(g.integers(3, 14))
    k = int(g.integers(1, E))
    pi = k * g.dirichlet(np.full(E, 0.7), size=3)
    for _ in range(50):  # make it feasible: cap at 1, hand the excess to the others
        over = np.clip(pi - 1, 0, None).sum(axis=1, keepdims=True)
        pi = np.minimum(pi, 1.0)
        room = np.where(pi < 1, pi, 0.0)
        pi = pi + room / room.sum(axis=1, keepdims=True) * over
    lam, forced, k_free = _fit_cps(pi, k)
    got = _cps_inclusion(lam, k_free)
    got[forced] = 1.0
    assert np.abs(got - pi).max() < 2e-7  # forced threshold is 1 - 1e-7


@pytest.mark.parametrize("rows, msg", [
    ([[0.5, 0.5]], "has 2 columns but the model has 8 experts"),
    ([[0.2] * 8], "row 0 sums to 1.6"),
    ([[0.125] * 8, [0.1] * 8], "row 1 sums to 0.8"),
    ([[-0.125] + [0.25] + [0.125] * 6], "row 0 has a negative"),
    ([[0.125] * 8] * 5, "has 5 rows but the model has 4 MoE layers"),
])
def test_histogram_errors_name_file_and_row(tmp_path, rows, msg):
    path = tmp_path / "bad.csv"
    np.savetxt(path, np.array(rows), delimiter=",")
    s = spec(distribution="histogram", histogram_file=str(path))
    with pytest.raises(InputError, match="routing.histogram_file") as ei:
        check_routing_files(s, 8, 4)
    assert "bad.csv" in str(ei.value) and msg in str(ei.value)
    with pytest.raises(ValueError, match=msg):
        sample_loads(s, 10, 8, 2, 4, rng())


def test_histogram_share_above_one_over_k(tmp_path):
    path = tmp_path / "skew.csv"
    np.savetxt(path, np.array([[0.6] + [0.4 / 7] * 7]), delimiter=",")
    s = spec(distribution="histogram", histogram_file=str(path))
    check_routing_files(s, 8, 2)  # fine without top_k (k = 1 could do it)
    sample_loads(s, 10, 8, 1, 2, rng())
    with pytest.raises(InputError, match="row 0 gives expert 0 a share of 0.6"):
        check_routing_files(s, 8, 2, top_k=2)
    with pytest.raises(InputError, match="more than 1/top_k"):
        sample_loads(s, 10, 8, 2, 2, rng())


def test_missing_and_unknown_files(tmp_path):
    for s, field in [(spec(distribution="histogram", histogram_file=str(tmp_path / "no.csv")),
                      "routing.histogram_file"),
                     (spec(distribution="trace", trace_file=str(tmp_path / "no.npz")),
                      "routing.trace_file")]:
        with pytest.raises(InputError, match=f"{field}: .*no such file"):
            check_routing_files(s, 8, 2)
    (tmp_path / "h.json").write_text("{}")
    with pytest.raises(InputError, match="unknown file type"):
        check_routing_files(spec(distribution="histogram", histogram_file=str(tmp_path / "h.json")),
                            8, 2)
    (tmp_path / "h.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="cannot be read"):
        check_routing_files(spec(distribution="histogram", histogram_file=str(tmp_path / "h.csv")),
                            8, 2)


def test_trace_replay_window_and_cycling(trace_npz):
    path, ids = trace_npz  # [3 layers, 50 tokens, k=2]
    s = spec(distribution="trace", trace_file=path)
    full = np.stack([np.bincount(ids[i].ravel(), minlength=8) for i in range(3)])
    # the whole trace, from any start offset: the same counts
    for seed in range(3):
        assert np.array_equal(sample_loads(s, 50, 8, 2, 3, rng(seed)), full)
    # more layers than the trace: cycled; more tokens: wrapped around
    five = sample_loads(s, 100, 8, 2, 5, rng(0))
    assert np.array_equal(five, 2 * full[[0, 1, 2, 0, 1]])
    # a shorter window is a contiguous (wrapping) slice of the trace
    part = sample_loads(s, 10, 8, 2, 3, rng(4))
    start = int(rng(4).integers(50))
    tok = (start + np.arange(10)) % 50
    want = np.stack([np.bincount(ids[i, tok].ravel(), minlength=8) for i in range(3)])
    assert np.array_equal(part, want)
    assert np.allclose(inclusion_probabilities(s, 8, 2, 3), full / 50)


@pytest.mark.parametrize("make, msg", [
    (lambda ids: ids.astype(float), "must be integers"),
    (lambda ids: np.where(ids == 3, 9, ids), "expert id 9 at layer"),
    (lambda ids: np.where(ids == 3, -1, ids), "expert id -1 at layer"),
    (lambda ids: np.concatenate([ids[..., :1], ids[..., :1]], axis=2), "picks the same expert"),
    (lambda ids: ids[..., :1], "tokens pick 1 experts but the model's top_k is 2"),
    (lambda ids: ids[0], "expected an array \\[layers, tokens, k\\]"),
    (lambda ids: np.concatenate([ids, ids]), "has 6 layers but the model has 4"),
])
def test_trace_errors(tmp_path, trace_npz, make, msg):
    bad = make(trace_npz[1])
    path = tmp_path / "bad.npy"
    np.save(path, bad)
    s = spec(distribution="trace", trace_file=str(path))
    with pytest.raises(InputError, match=msg) as ei:
        check_routing_files(s, 8, 4, top_k=2)
    assert "routing.trace_file" in str(ei.value) and "bad.npy" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------------------------

def test_static_placements():
    c = place_experts(8, 4, "contiguous")
    assert np.array_equal(c.slot_expert, [[0, 1], [2, 3], [4, 5], [6, 7]])
    r = place_experts(8, 4, "round_robin")
    assert np.array_equal(r.slot_expert, [[0, 4], [1, 5], [2, 6], [3, 7]])
    loads = np.array([5, 1, 0, 2, 7, 7, 1, 1])
    assert np.array_equal(c.rank_loads(loads), [6, 2, 14, 2])
    assert np.array_equal(r.rank_loads(loads), [12, 8, 1, 3])
    uneven = place_experts(10, 4, "contiguous")
    assert np.array_equal(uneven.slot_expert[2:], [[6, 7, -1], [8, 9, -1]])
    assert uneven.rank_loads(np.ones(10, dtype=np.int64)).tolist() == [3, 3, 2, 2]


def test_eplb_reduces_max_rank_load_on_skewed_routing():
    s = spec(distribution="zipf", s=1.2, placement="eplb", redundant_experts=8)
    E, ep = 64, 8
    row = sample_loads(s, 512, E, 8, 1, rng(3))[0]
    p = place_experts(E, ep, "eplb", 8, row)
    cont = place_experts(E, ep, "contiguous").rank_loads(row)
    after = p.rank_loads(row)
    assert after.sum() == cont.sum() == row.sum()
    assert after.max() < 0.6 * cont.max()  # measured: 1120 -> 513
    assert np.allclose(p.planned_before, cont) and np.allclose(p.planned_after, after, atol=1)
    assert p.replicas.sum() == E + 8 and p.slot_expert.shape == (ep, 9)
    hot = int(np.argmax(row))
    assert p.replicas[hot] >= 2
    sl = p.slot_loads(row)
    assert sl[p.slot_expert == hot].sum() == row[hot]  # replicas split the tokens
    assert sl[p.slot_expert == hot].max() - sl[p.slot_expert == hot].min() <= 1
    # replicas of one expert sit on different ranks
    for e in np.flatnonzero(p.replicas > 1):
        assert len(set(np.argwhere(p.slot_expert == e)[:, 0])) == p.replicas[e]
    # planned on expected loads (stable zipf popularity), it still helps a fresh batch
    plan = expected_loads(s, 512, E, 8, 1)[0]
    fresh = sample_loads(s, 512, E, 8, 1, rng(9))[0]
    planned = rank_expert_loads(fresh, ep, s, planning_loads=plan)
    assert planned.sum() == fresh.sum()
    assert planned.sum(axis=1).max() < place_experts(E, ep).rank_loads(fresh).max()
    # float loads split exactly
    assert np.isclose(p.rank_loads(row.astype(float)).sum(), row.sum())


def test_rank_expert_loads_shapes():
    row = balanced_loads(16, 16, 2)
    assert rank_expert_loads(row, 4, spec()).shape == (4, 4)
    assert rank_expert_loads(row, 4, spec(placement="round_robin")).sum() == 32
    assert rank_expert_loads(row, 4, spec(placement="eplb", redundant_experts=4)).shape == (4, 5)


@pytest.mark.parametrize("args, msg", [
    ((64, 8, "eplb", 3, np.ones(64)), "multiple of ep"),
    ((64, 8, "contiguous", 8, None), "redundant_experts=8 needs placement 'eplb'"),
    ((64, 8, "eplb", 8, None), "needs the expert loads"),
    ((64, 8, "eplb", 8, np.ones(32)), "loads must be 64"),
    ((64, 8, "eplb", 8, -np.ones(64)), "loads must be 64"),
    ((4, 2, "eplb", 6, np.ones(4)), "at most one replica per rank"),
    ((64, 0, "contiguous", 0, None), "ep must be"),
    ((64, 8, "random", 0, None), "placement must be"),
])
def test_placement_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        place_experts(*args)


# ---------------------------------------------------------------------------------------------
# capacity
# ---------------------------------------------------------------------------------------------

def test_capacity_policies_on_a_known_row():
    n = np.array([7, 0, 3, 1, 1, 0])  # T=6, k=2: 12 slots; cap = ceil(1.0*12/6) = 2
    assert expert_capacity(6, 6, 2, 1.0) == 2
    assert expert_capacity(10, 8, 2, 1.2) == 3  # 1.2*20/8 = 3.0 exactly: not rounded up
    drop = apply_capacity(n, 6, 2, 1.0, "drop")
    assert drop.processed.tolist() == [2, 0, 2, 1, 1, 0] and int(drop.dropped) == 6
    assert math.isclose(float(drop.drop_fraction), 0.5)
    rr = apply_capacity(n, 6, 2, 1.0, "reroute")
    assert rr.processed.tolist() == [2, 2, 2, 2, 2, 2]
    assert int(rr.rerouted) == 6 and int(rr.dropped) == 0
    rr_small = apply_capacity(n, 6, 2, 0.5, "reroute")  # cap 1: only 6 slots fit
    assert rr_small.processed.tolist() == [1] * 6
    assert int(rr_small.rerouted) == 2 and int(rr_small.dropped) == 6
    sp = apply_capacity(n, 6, 2, 1.0, "second_pass")
    assert sp.rounds.tolist() == [[2, 0, 2, 1, 1, 0], [2, 0, 1, 0, 0, 0], [2, 0, 0, 0, 0, 0],
                                  [1, 0, 0, 0, 0, 0]]
    assert int(sp.extra_passes) == 3 and sp.processed.tolist() == n.tolist()
    for dl in (apply_capacity(n, 6, 2, None, "drop"), apply_capacity(n, 6, 2, 1.0, "dropless")):
        assert dl.processed.tolist() == n.tolist() and dl.capacity is None
        assert int(dl.dropped) == 0
    stack = apply_capacity(np.stack([n, n[::-1]]), 6, 2, 1.0, "second_pass")
    assert stack.rounds.shape == (2, 4, 6) and stack.extra_passes.tolist() == [3, 3]


def test_capacity_errors():
    with pytest.raises(ValueError, match="overflow"):
        apply_capacity(np.array([1, 1]), 1, 2, 1.0, "spill")
    with pytest.raises(ValueError, match="capacity_factor"):
        apply_capacity(np.array([1, 1]), 1, 2, 0.0, "drop")
    with pytest.raises(ValueError, match="integer"):
        apply_capacity(np.array([1.0, 1.0]), 1, 2, 1.0, "drop")


def test_drop_fraction_closed_form_vs_monte_carlo():
    # expected_drop_fraction is exact under uniform routing (linearity): 4 SE.
    T, E, k, S = 256, 128, 8, 600
    x = sample_loads(spec(distribution="uniform"), T, E, k, 1, rng(2), num_samples=S)[:, 0]
    for c in (1.0, 1.25):
        d = apply_capacity(x, T, k, c, "drop").drop_fraction
        want = expected_drop_fraction(T, E, k, c)
        assert abs(d.mean() - want) < 4 * d.std() / math.sqrt(S)
    # the reference notes' numbers (§4.8): 9.6 %, 2.1 %, 0.26 % and 2.4 % at T=4096
    assert [round(100 * expected_drop_fraction(256, 128, 8, g), 2) for g in (1.0, 1.25, 1.5)] \
        == [9.61, 2.08, 0.26]
    assert round(100 * expected_drop_fraction(4096, 128, 8, 1.0), 1) == 2.4
    assert expected_drop_fraction(0, 128, 8, 1.0) == 0.0


# ---------------------------------------------------------------------------------------------
# closed forms vs Monte Carlo (uniform routing)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uniform_draws():
    """Uniform-routing draws for a few shapes, shared by the closed-form checks."""
    out = {}
    for T, E, k, S in [(8, 8, 2, 4000), (64, 8, 2, 3000), (16, 128, 8, 1500),
                       (256, 128, 8, 1000), (1, 64, 6, 3000), (3, 16, 4, 3000)]:
        out[(T, E, k)] = sample_loads(spec(distribution="uniform"), T, E, k, 1, rng(T + E),
                                      num_samples=S)[:, 0]
    return out


def _mc(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(v.size))


def test_distinct_experts_and_padding_are_exact(uniform_draws):
    for (T, E, k), x in uniform_draws.items():
        m, se = _mc(distinct_experts(x))
        # (+1e-6 relative: events rarer than 1/draws, e.g. an idle expert at T=64, E=8, k=2
        # with probability 8 * (3/4)^64 = 8e-8, leave SE = 0)
        want = expected_distinct_experts(T, E, k)
        assert abs(m - want) < 4 * se + 1e-6 * want
        for b in (16, 64):
            m, se = _mc(padded_rows(x, b))
            want = expected_padded_rows(T, E, k, b)
            assert abs(m - want) < 4 * se + 1e-6 * want


def test_max_load_closed_form(uniform_draws):
    # Independence approximation underestimates (loads sum to T*k, i.e. are anti-correlated):
    # measured -3.6 % at (8, 8, 2), -1.9 % at (64, 8, 2), -0.5 % at (16, 128, 8), -3.2 % at
    # (3, 16, 4). The fixed-sum correction leaves <= 1.2 %: allow 1.5 % on top of 4 SE.
    for (T, E, k), x in uniform_draws.items():
        m, se = _mc(x.max(axis=1))
        corr = expected_max_load(T, E, k)
        indep = expected_max_load(T, E, k, correlated=False)
        assert abs(corr - m) < 4 * se + 0.015 * m, (T, E, k, corr, m)
        assert indep <= m + 4 * se and abs(indep - m) < 4 * se + 0.04 * m
        assert T * k / E <= corr <= T


def test_max_rank_load_closed_form(uniform_draws):
    # Rank load pmf exact (FFT of the hypergeometric); max over ranks: independence plus the
    # fixed-sum correction. Measured: <= 0.4 % for T >= 3; -3.4 % at T = 1, ep = 8 (tiny,
    # discrete loads). Allowed: 1 % (T >= 3) / 4 % (T = 1) on top of 4 SE.
    for (T, E, k), x in uniform_draws.items():
        for ep in (2, 8):
            rl = x.reshape(x.shape[0], ep, E // ep).sum(axis=2).max(axis=1)
            m, se = _mc(rl)
            want = expected_max_rank_load(T, E, k, ep)
            tol = 0.04 if T == 1 else 0.01
            assert abs(want - m) < 4 * se + tol * m, (T, E, k, ep, want, m)
    assert expected_max_rank_load(100, 64, 8, 1) == 800.0


def test_normal_branches_continue_the_exact_ones():
    # max load: exact binomial up to sd = 60, normal above; rank load: exact up to T*s = 4096
    E, k = 16, 8  # p = 1/2: sd = sqrt(T)/2 -> the switch is at T = 14400
    a = expected_max_load(np.array([14396, 14400, 14404, 14408]), E, k)
    assert np.all(np.diff(a) > 0) and np.all(np.diff(a) < 4)
    b = expected_max_rank_load(np.array([510, 511, 512, 513, 514]), 128, 8, 8)
    assert np.all(np.diff(b) > 0) and np.all(np.abs(np.diff(np.diff(b))) < 0.3)


def test_closed_forms_are_vectorised():
    T = np.array([0, 1, 2, 7, 64, 300, 5000])
    for f, args in [(expected_distinct_experts, (64, 6)), (expected_max_load, (64, 6)),
                    (expected_max_rank_load, (64, 6, 8)), (expected_padded_rows, (64, 6, 16)),
                    (expected_drop_fraction, (64, 6, 1.1))]:
        vec = f(T, *args)
        assert vec.shape == T.shape
        assert np.allclose(vec, [f(int(t), *args) for t in T], rtol=1e-12, atol=1e-12)
        assert isinstance(f(5, *args), float)
    grid = expected_max_load(np.arange(1, 4001).reshape(40, 100), 256, 8)
    assert grid.shape == (40, 100) and np.all(np.diff(grid.ravel()) >= -1e-9)


def test_notes_table_sanity():
    # notes §2.2 table (own simulation, 20-200 trials): padding 1.44x / 4.0x at T=64, E=8, k=2
    assert round(expected_padded_rows(64, 8, 2, 16) / 128, 2) == 1.43
    assert round(expected_padded_rows(256, 128, 8, 64) / 2048, 1) == 4.0
    assert round(expected_distinct_experts(16, 128, 8), 0) == 82
    assert round(expected_max_load(4096, 128, 8) / 256, 2) == 1.16


@pytest.mark.parametrize("call, msg", [
    (lambda: expected_max_rank_load(10, 64, 8, 3), "does not divide"),
    (lambda: expected_max_rank_load(10, 64, 8, 0), "ep must be"),
    (lambda: expected_padded_rows(10, 64, 8, 0), "block_m"),
    (lambda: expected_drop_fraction(10, 64, 8, 0.0), "capacity_factor"),
    (lambda: expected_max_load(-1, 64, 8), "num_tokens"),
    (lambda: expected_max_load(1.5, 64, 8), "num_tokens"),
    (lambda: expected_distinct_experts(4, 8, 9), "top_k"),
    (lambda: padded_rows(np.ones(3, dtype=int), 0), "block_m"),
])
def test_closed_form_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_helpers():
    row = np.array([0, 3, 17, 0, 4])
    assert distinct_experts(row) == 3
    assert padded_rows(row, 16) == 16 + 32 + 16
    assert math.isclose(float(imbalance(row)), 17 / (24 / 5))
    assert float(imbalance(np.zeros(4))) == 1.0
    assert imbalance(np.stack([row, row])).shape == (2,)
