"""Counter-based sampling noise: the randomness a sequence uses at an output position is a pure
function of (seed, sample index, output position, stream), never of how many draws came before.

That is what makes a seeded request's text independent of everything the engine decides on its
own: how many tokens were drafted and verified in a step, which other requests share the batch,
where a prompt was chunked, whether the sequence was preempted and recomputed. Plain decoding
draws position t's token as argmax(p_t / E_t) with E_t = the TARGET noise of position t; every
speculative method that verifies with the same E_t (sample-and-match, the coupled draft model)
emits exactly that token.

On CPU the noise comes from numpy's Philox4x64, a counter-based generator: key = (seed, index),
counter = (0, position, stream, 0); the lowest counter word advances as one row's values are
drawn. Elsewhere a torch generator on the device is seeded with a 64-bit mix of the four numbers.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch

# Streams: independent noise for the different uses at one position.
TARGET = 0  # the target's own sample (plain sampling, sample-and-match, the coupled draft, the bonus)
DRAFT = 1  # the draft model's sample in the standard rejection sampler
ACCEPT = 2  # the acceptance uniform of the standard rejection sampler
RESIDUAL = 3  # the residual sample after a standard rejection

_MASK64 = (1 << 64) - 1


class NoiseKey(NamedTuple):
    seed: int  # 0 .. 2**64 - 1
    index: int  # which of the request's n samples
    position: int  # output position (0 = the first generated token)
    stream: int


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mixed_seed(key: NoiseKey) -> int:
    """One 64-bit seed from the four numbers of a key (for torch generators)."""
    h = _splitmix64(key.seed)
    for part in (key.index, key.position, key.stream):
        h = _splitmix64(h ^ (part & _MASK64))
    return h


class _Philox(threading.local):
    """One Philox4x64 bit generator per thread whose state is set to a key's before each use
    (constructing one costs ~30 us, setting the state ~4 us)."""

    def __init__(self) -> None:
        self.bits = np.random.Philox(0)
        self.generator = np.random.Generator(self.bits)
        self.state = self.bits.state
        self.state["buffer_pos"] = 4  # the 4-word output buffer starts empty
        self.state["has_uint32"] = 0

    def at(self, key: NoiseKey) -> np.random.Generator:
        state = self.state
        state["state"]["key"] = np.array([key.seed & _MASK64, key.index & _MASK64], dtype=np.uint64)
        state["state"]["counter"] = np.array([0, key.position & _MASK64, key.stream & _MASK64, 0], dtype=np.uint64)
        self.bits.state = state
        return self.generator


_philox = _Philox()


def _numpy_generator(key: NoiseKey) -> np.random.Generator:
    """numpy's Philox with key (seed, index) and counter (0, position, stream, 0): the same
    stream as np.random.Philox(key=seed + 2**64 index, counter=2**64 position + 2**128 stream)."""
    return _philox.at(key)


def exponential(key: NoiseKey, size: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [size] float32 for one key (never exactly 0: p / E must stay defined)."""
    if device.type == "cpu":
        out = _numpy_generator(key).standard_exponential(size, dtype=np.float32)
        np.maximum(out, np.finfo(np.float32).tiny, out=out)
        return torch.from_numpy(out)
    g = torch.Generator(device=device)
    g.manual_seed(mixed_seed(key))
    noise = torch.empty(size, device=device).exponential_(generator=g)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def uniform(key: NoiseKey) -> float:
    """One U[0, 1) draw (float64) for one key; the same on every device."""
    return float(_numpy_generator(key).random())


class NoiseCache:
    """A step's noise rows by key, drawn once: the coupled draft model and the verifier read the
    same TARGET noise of a position. Make a new one every step."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._rows: dict[NoiseKey, torch.Tensor] = {}

    def exponential(self, key: NoiseKey) -> torch.Tensor:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = exponential(key, self.vocab_size, self.device)
        return row

    def rows(self, keys: list[NoiseKey | None]) -> torch.Tensor:
        """[len(keys), V]; rows whose key is None (greedy rows) are ones."""
        ones = None
        out = []
        for key in keys:
            if key is None:
                ones = torch.ones(self.vocab_size, device=self.device) if ones is None else ones
                out.append(ones)
            else:
                out.append(self.exponential(key))
        return torch.stack(out) if out else torch.empty(0, self.vocab_size, device=self.device)
