"""KV memory accounting: blocks per sequence, never more than the pool."""

from __future__ import annotations

import random

import pytest
from m4d.engine.kvpool import KVCapacityError, KVPool


def test_blocks_are_rounded_up_and_grow_with_the_sequence() -> None:
    pool = KVPool(total_tokens=100, block_size=16)  # 6 whole blocks
    assert pool.num_blocks == 6 and pool.capacity == 96
    assert pool.grow(1, 1) and pool.held(1) == 1
    assert pool.grow(1, 16) and pool.held(1) == 1, "a full block needs no new one"
    assert pool.needed(1, 17) == 1
    assert pool.grow(1, 17) and pool.held(1) == 2
    assert pool.grow(1, 5) and pool.held(1) == 2, "holding never shrinks until release"
    assert pool.used == 2 and pool.free == 4


def test_grow_refuses_rather_than_exceed_and_takes_nothing() -> None:
    pool = KVPool(total_tokens=64, block_size=16)
    assert pool.grow(1, 48)
    assert not pool.grow(2, 32)
    assert pool.held(2) == 0 and pool.used == 3
    assert pool.grow(2, 16) and pool.free == 0
    assert not pool.grow(1, 49)
    assert pool.release(1) == 3 and pool.free == 3
    assert pool.release(1) == 0, "releasing twice is harmless"


def test_a_sequence_larger_than_the_pool_is_refused() -> None:
    pool = KVPool(total_tokens=64, block_size=16)
    pool.check_fits(1, 64)
    with pytest.raises(KVCapacityError, match="needs KV cache for 65 tokens") as err:
        pool.check_fits(1, 65)
    assert isinstance(err.value, ValueError)


def test_pool_must_hold_a_block() -> None:
    with pytest.raises(ValueError, match="cannot hold one block"):
        KVPool(total_tokens=8, block_size=16)


def test_random_grow_and_release_never_exceed_the_pool() -> None:
    rng = random.Random(3)
    pool = KVPool(total_tokens=200, block_size=8)
    tokens: dict[int, int] = {}
    for _ in range(5000):
        seq_id = rng.randint(0, 9)
        if rng.random() < 0.1:
            pool.release(seq_id)
            tokens.pop(seq_id, None)
        elif pool.grow(seq_id, tokens.get(seq_id, 0) + rng.randint(1, 20)):
            tokens[seq_id] = max(tokens.get(seq_id, 0), pool.held(seq_id) * 8 - 7)
        assert 0 <= pool.used <= pool.num_blocks
        assert pool.used == sum(pool.held(i) for i in range(10))
