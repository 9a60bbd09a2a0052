"""Mixture: ratios within sampling error, determinism, order within a source, epochs, stop, resume."""

from __future__ import annotations

import itertools
import math

import pytest

from ringlwm.data import Mixture


def tagged(name, n):
    return [(name, i) for i in range(n)]


def test_ratios_within_sampling_error():
    weights = [0.5, 0.3, 0.15, 0.05]
    mix = Mixture({k: tagged(k, 1000) for k in "abcd"}, weights, seed=123)
    n = 20_000
    draws = list(itertools.islice(mix, n))
    for k, w in zip("abcd", weights):
        count = sum(1 for name, _ in draws if name == k)
        sigma = math.sqrt(n * w * (1 - w))
        assert abs(count - n * w) < 4.5 * sigma, (k, count, n * w)
    # restarts happened (1000 per source), and were counted
    assert mix.stats["a"]["epochs"] == pytest.approx(n * 0.5 / 1000, abs=1)
    assert sum(s["drawn"] for s in mix.stats.values()) == n


def test_weights_by_name_and_zero_weight():
    mix = Mixture({"books": tagged("books", 50), "chat": tagged("chat", 50), "off": tagged("off", 50)},
                  weights={"chat": 1, "books": 3, "off": 0}, seed=0)
    draws = list(itertools.islice(mix, 4000))
    assert not any(name == "off" for name, _ in draws)
    frac = sum(name == "books" for name, _ in draws) / len(draws)
    assert abs(frac - 0.75) < 4.5 * math.sqrt(0.75 * 0.25 / 4000)


def test_deterministic_given_seed_and_order_kept():
    sources = [tagged("a", 300), tagged("b", 300)]
    one = list(itertools.islice(Mixture(sources, [1, 1], seed=7), 500))
    two = list(itertools.islice(Mixture(sources, [1, 1], seed=7), 500))
    other = list(itertools.islice(Mixture(sources, [1, 1], seed=8), 500))
    assert one == two and one != other
    for name in "ab":
        assert [i for k, i in one if k == name] == list(range(sum(k == name for k, _ in one)))


def test_stop_ends_at_first_exhaustion():
    mix = Mixture({"a": tagged("a", 5), "b": tagged("b", 1000)}, [1, 1], seed=0, on_exhausted="stop")
    it = iter(mix)
    got = list(it)
    assert sum(k == "a" for k, _ in got) == 5 and len(got) < 1000
    assert next(it, None) is None  # stays ended
    assert mix.stats["a"]["epochs"] == 0


def test_resume_is_exact_including_epochs():
    sources = {"a": tagged("a", 7), "b": tagged("b", 13), "c": tagged("c", 3)}
    full = list(itertools.islice(Mixture(sources, [2, 1, 1], seed=3), 3000))
    for k in (0, 1, 500, 1023, 1024, 2047, 2999):
        it = iter(Mixture(sources, [2, 1, 1], seed=3))
        for _ in range(k):
            next(it)
        state = it.state_dict()
        fresh = Mixture(sources, [2, 1, 1], seed=3)
        assert list(itertools.islice(fresh.iter_from(state), 3000 - k)) == full[k:]
    # stats of the restored run equal those of the uninterrupted one
    ref = Mixture(sources, [2, 1, 1], seed=3)
    list(itertools.islice(ref, 3000))
    assert {k: (v["drawn"], v["epochs"]) for k, v in fresh.stats.items()} == \
        {k: (v["drawn"], v["epochs"]) for k, v in ref.stats.items()}


def test_factories_and_streams_as_sources():
    def gen():
        yield from tagged("g", 4)

    mix = Mixture([gen, tagged("l", 4)], [1, 1], seed=0)
    got = list(itertools.islice(mix, 40))
    assert {k for k, _ in got} == {"g", "l"}
    assert [i for k, i in got if k == "g"][:8] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "sources, weights, match",
    [
        ([], None, "at least one"),
        ([[1]], [1, 2], "1 sources but 2 weights"),
        ([[1], [2]], [1, -1], "non-negative"),
        ([[1], [2]], [0, 0], "not all zero"),
        ([[1], [2]], [1, float("nan")], "finite"),
        ({"a": [1]}, {"b": 1}, "weights name"),
        ([[1]], {"a": 1}, "weights name"),
    ],
)
def test_bad_arguments(sources, weights, match):
    with pytest.raises(ValueError, match=match):
        Mixture(sources, weights)


def test_bad_on_exhausted_and_one_shot_source():
    with pytest.raises(ValueError, match="on_exhausted"):
        Mixture([[1]], on_exhausted="drop")
    with pytest.raises(TypeError, match="one-shot"):
        Mixture([iter([1, 2])])


def test_empty_source_cannot_restart():
    mix = Mixture({"empty": [], "ok": tagged("ok", 3)}, seed=0)
    with pytest.raises(ValueError, match="'empty' yields no examples"):
        list(itertools.islice(mix, 50))
