"""The block manager: sequences' blocks in a row where the pool allows, claims that end with their sequence, and the
least recently freed block (evicting its cached prefix) when no open block is left."""

from __future__ import annotations

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
