"""Mixtures: several example streams interleaved at set ratios, deterministic given the seed.

    mix = Mixture({"books": books, "chat": chat}, weights={"books": 0.7, "chat": 0.3}, seed=0)

Each draw picks a source at random with probability weight / sum(weights) and yields that source's next
example, so the ratios hold for *examples* (documents), not tokens: to mix by tokens, divide each weight
by the source's mean document length. Sources keep their own order; nothing is shuffled within one.

The draws are i.i.d. and depend on nothing but (seed, draw index): block b of 1024 draws comes from
``np.random.default_rng([seed, b])``. So the saved state is a draw count plus each source's position, a
restore is O(1), and two runs with one seed interleave identically. A source that runs out either
restarts from its beginning (``on_exhausted="restart"``, the default: epochs, counted in ``stats``) or
ends the whole mixture at the first draw that finds it empty (``"stop"``); weights never change
mid-stream, which is what keeps the draw sequence a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ringlwm.data.stream import Stream, as_stream

BLOCK = 1024
ON_EXHAUSTED = ("restart", "stop")


class _MixtureIterator:
    def __init__(self, mix: Mixture, state: dict | None):
        self.mix = mix
        n = len(mix.streams)
        self._draws = state["draws"] if state else 0
        if state:
            mix.drawn, mix.epochs = list(state["drawn"]), list(state["epochs"])
        subs = state["sources"] if state else [None] * n
        self._its = [stream.iter_from(sub) for stream, sub in zip(mix.streams, subs)]
        self._block_index, self._block = -1, None

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        mix = self.mix
        return {"draws": self._draws, "drawn": list(mix.drawn), "epochs": list(mix.epochs),
                "sources": [it.state_dict() for it in self._its]}

    def _choice(self, draw: int) -> int:
        block, i = divmod(draw, BLOCK)
        if block != self._block_index:
            self._block, self._block_index = self.mix.choices(block), block
        return int(self._block[i])

    def __next__(self):
        mix = self.mix
        s = self._choice(self._draws)
        self._draws += 1
        try:
            example = next(self._its[s])
        except StopIteration:
            if mix.on_exhausted == "stop":
                self._draws -= 1  # every later call stops here too, and the saved state says so
                raise
            mix.epochs[s] += 1
            self._its[s] = mix.streams[s].iter_from(None)
            try:
                example = next(self._its[s])
            except StopIteration:
                raise ValueError(
                    f"mixture source {mix.names[s]!r} yields no examples (empty, or every record skipped), so it "
                    "cannot restart; drop it or give it weight 0"
                ) from None
        mix.drawn[s] += 1
        return example


class Mixture(Stream):
    """Interleave example streams with sampling weights; see the module docstring.

    sources: a list of streams (or lists, or factories), or a dict name -> stream. weights: one
    non-negative number per source (a list in the same order, or a dict by name); None for equal weights.
    """

    def __init__(self, sources: Sequence | Mapping, weights: Sequence[float] | Mapping[str, float] | None = None,
                 seed: int = 0, *, on_exhausted: str = "restart"):
        if isinstance(sources, Mapping):
            names = [str(k) for k in sources]
            streams = list(sources.values())
        else:
            streams = list(sources)
            names = [str(i) for i in range(len(streams))]
        if not streams:
            raise ValueError("a mixture needs at least one source")
        if weights is None:
            weights = [1.0] * len(streams)
        elif isinstance(weights, Mapping):
            if not isinstance(sources, Mapping) or set(weights) != set(sources):
                have = sorted(map(str, sources)) if isinstance(sources, Mapping) else "a list"
                raise ValueError(f"weights name {sorted(map(str, weights))} but the sources are {have}")
            weights = [weights[k] for k in sources]
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(streams),):
            raise ValueError(f"{len(streams)} sources but {weights.size} weights")
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        self.names = names
        self.streams = [as_stream(s, f"mixture source {name!r}") for s, name in zip(streams, names)]
        self.probs = weights / weights.sum()
        self._cdf = np.cumsum(self.probs)
        self._cdf[-1] = 1.0  # rounding must not leave a sliver above the last source
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        self.drawn = [0] * len(streams)
        self.epochs = [0] * len(streams)

    def choices(self, block: int) -> np.ndarray:
        """Source indices of draws [block * BLOCK, (block + 1) * BLOCK)."""
        u = np.random.default_rng([self.seed, block]).random(BLOCK)
        # side="right": a zero-weight source has an empty interval and is never picked
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.streams) - 1)

    def iter_from(self, state: dict | None) -> _MixtureIterator:
        if state is not None and len(state["sources"]) != len(self.streams):
            raise ValueError(f"mixture state has {len(state['sources'])} sources, this mixture {len(self.streams)}")
        return _MixtureIterator(self, state)

    @property
    def stats(self) -> dict:
        """Per source: examples drawn, completed epochs (restarts), and the source's own stats if it has any."""
        return {
            name: {"drawn": d, "epochs": e, "source": getattr(s, "stats", None)}
            for name, d, e, s in zip(self.names, self.drawn, self.epochs, self.streams)
        }

    def __repr__(self) -> str:
        ratios = ", ".join(f"{n}: {p:.3g}" for n, p in zip(self.names, self.probs))
        return f"Mixture({{{ratios}}}, seed={self.seed}, on_exhausted={self.on_exhausted!r})"
