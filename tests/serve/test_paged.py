"""The block manager: sequences' blocks in a row where the pool allows, claims that end with their sequence, and the
least recently freed block (evicting its cached prefix) when no open block is left."""

from __future__ import annotations

import random

import pytest

from lmforge.serve.paged import BlockManager


def grow(manager: BlockManager, table: list[int], room: int) -> None:
    table.append(manager.allocate(table[-1] if table else None, room=room - len(table)))


def test_interleaved_sequences_each_get_blocks_in_a_row():
    manager = BlockManager(64, 4)
    tables: list[list[int]] = [[], [], []]
    for _ in range(10):  # three sequences growing a block each in turn, as decodes do
        for table in tables:
            grow(manager, table, room=12)
    for table in tables:
        assert table == list(range(table[0], table[0] + 10))
    assert len({b for t in tables for b in t}) == 30  # no block twice


def test_claims_end_with_their_sequence_and_their_blocks_are_placed_again():
    manager = BlockManager(16, 4)
    a, b = [], []
    grow(manager, a, room=8)
    grow(manager, b, room=8)  # claims the other 8
    assert manager.claimed[:16].all()
    manager.release(a)
    assert manager.claimed[:16].sum() == 8 and a[0] not in manager.claims
    c = []
    grow(manager, c, room=4)
    assert c[0] in range(a[0], a[0] + 8)  # placed where a's claim was
    manager.release(b)
    manager.release(c)
    assert not manager.claims and not manager.claimed.any() and manager.num_free == 16


def test_a_sequence_past_its_claim_goes_on_beyond_the_next_claim():
    manager = BlockManager(12, 4)
    a, b = [], []
    grow(manager, a, room=3)
    grow(manager, b, room=3)
    for _ in range(5):  # a outgrows its 3 blocks: the block after its last is b's, the two after that b's claim
        a.append(manager.allocate(a[-1], room=1))
    assert a[:3] == [a[0], a[0] + 1, a[0] + 2] and a[3] == b[0] + 3 and a[4:] == [a[3] + 1, a[3] + 2]
    assert manager.num_free == 5


def test_without_open_blocks_the_least_recently_freed_cached_block_is_evicted():
    manager = BlockManager(4, 4)
    tables = [[manager.allocate()] for _ in range(4)]
    for i, table in enumerate(tables):
        manager.register(table[0], block_hash=100 + i)
    for table in tables[::-1]:  # freed last to first: the block of tables[3] is the least recently freed
        manager.release(table)
    assert manager.num_free == 4 and not manager.open[:4].any()  # free, but each holds a cached prefix
    block = manager.allocate()
    assert block == tables[3][0] and 103 not in manager.by_hash  # its prefix is gone from the cache
    assert manager.lookup(100) == tables[0][0]  # the others are still cached


def test_with_move_a_taken_blocks_cached_prefix_moves_to_the_least_recently_freed_block():
    contents = list(range(6))  # what each block holds; move copies it, as the engine copies keys and values
    manager = BlockManager(6, 4, move=lambda source, target: contents.__setitem__(target, contents[source]))
    held = [manager.allocate() for _ in range(3)]  # blocks 0, 1, 2
    for block, prefix in zip(held, (100, 101, 102), strict=True):
        manager.register(block, prefix)
    manager.release(held)  # free order now 3, 4, 5, then 2, 1, 0; all six still open
    old = manager.allocate(room=6)  # the longest run starts at block 0, which holds prefix 100
    assert old == 0 and contents[3] == 0  # 100's keys went to block 3, the least recently freed
    assert manager.by_hash[100] == 3 and manager.hash_of[3] == 100 and 0 not in manager.hash_of
    assert list(manager.free)[-1] == 3  # as if freed just now
    assert manager.allocate(old) == 1 and manager.by_hash[101] == 4  # 101 moves to the next oldest, block 4
    assert manager.lookup(100) == 3 and manager.lookup(101) == 4 and manager.lookup(102) == 2


def test_without_move_blocks_holding_cached_prefixes_stay_closed():
    manager = BlockManager(4, 4)
    block = manager.allocate()
    manager.register(block, 7)
    manager.release([block])
    assert not manager.open[block] and manager.open[[1, 2, 3]].all()
    assert manager.allocate(room=4) == 1  # the run after the cached block


@pytest.mark.parametrize("with_move", [True, False])
def test_random_operations_keep_the_books_and_every_cached_prefix_where_its_keys_are(with_move):
    rng = random.Random(0)
    contents: dict[int, object] = {}  # block -> what its keys and values are: a prefix hash, or a sequence's data

    def move(source: int, target: int) -> None:
        contents[target] = contents[source]

    manager = BlockManager(24, 4, move=move if with_move else None)
    tables: list[list[int]] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.45 and manager.num_free:  # a sequence starts or grows, writing its own data
            table = rng.choice(tables) if tables and rng.random() < 0.7 else None
            if table is None:
                tables.append(table := [])
            table.append(manager.allocate(table[-1] if table else None, room=rng.randrange(1, 8)))
            contents[table[-1]] = ("data", step)
        elif op < 0.65 and tables:  # a full block of a sequence gets indexed by its prefix hash
            block = rng.choice(rng.choice(tables) or [None])
            if block is not None and block not in manager.hash_of:
                manager.register(block, prefix := rng.randrange(10**9))
                contents[block] = prefix
        elif op < 0.9 and tables:  # a sequence ends
            manager.release(tables.pop(rng.randrange(len(tables))))
        elif manager.by_hash:  # a new sequence starts from a cached prefix
            block = manager.lookup(rng.choice(list(manager.by_hash)))
            tables.append([block])
        held = {b for t in tables for b in t}
        assert set(manager.free) == {b for b in range(24) if b not in held}
        assert all(manager.refs[b] == sum(t.count(b) for t in tables) for b in range(24))
        expected_open = [b in manager.free and (with_move or b not in manager.hash_of) for b in range(24)]
        assert manager.open[:-1].tolist() == expected_open
        assert {b: h for h, b in manager.by_hash.items()} == manager.hash_of
        assert all(contents[b] == h for h, b in manager.by_hash.items())  # a hit reads the keys it was cached with
    for table in tables:
        manager.release(table)
    assert not manager.claims and not manager.claimed.any() and manager.num_free == 24


def test_with_move_the_least_recently_freed_block_is_still_evicted_in_place():
    manager = BlockManager(3, 4, move=lambda source, target: pytest.fail("nothing to move"))
    blocks = [manager.allocate() for _ in range(3)]  # 0, 1, 2
    for block in blocks:
        manager.register(block, 10 + block)
    manager.release([blocks[1]]), manager.release([blocks[2]])  # freed in that order
    assert manager.allocate(blocks[0]) == 1 and 11 not in manager.by_hash and manager.by_hash[12] == 2
