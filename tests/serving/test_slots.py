"""SlotCache bookkeeping (its exactness inside the model is covered by test_engine.py): admitting
into free slots, retiring without copying, compaction, the column window shift and growth, and
growing the cross-attention length for a longer newcomer."""

import torch

from lexlora.serving.slots import SlotCache

LAYERS, HEADS, DIM = 2, 2, 3


def cross(rows, source, tag):
    """Per-layer cross keys/values whose every entry says which row (tag + row) and layer it is."""
    keys = [torch.full((rows, HEADS, source, DIM), 0.0) + (tag + torch.arange(rows).view(-1, 1, 1, 1)) * 10 + layer
            for layer in range(LAYERS)]
    values = [k + 0.5 for k in keys]
    return keys, values


def admit(pool, slots, source=4, tag=0, lengths=None):
    keys, values = cross(len(slots), source, tag)
    mask = torch.zeros(len(slots), source, dtype=torch.long)
    for row, length in enumerate(lengths or [source] * len(slots)):
        mask[row, :length] = 1
    pool.admit(slots, keys, values, mask)


def step(pool, value_of):
    """One decode step as the model runs it: every layer writes each slot's new column."""
    cache, self_mask, cross_mask = pool.step()
    rows = self_mask.shape[0]
    column = torch.tensor([float(value_of(slot)) for slot in range(rows)]).view(rows, 1, 1, 1)
    for layer in range(LAYERS):
        keys = column.expand(rows, HEADS, 1, DIM) + layer
        cache.self_attention_cache.update(keys, keys + 0.5, layer)
    pool.advance()
    return self_mask, cross_mask


def live_keys(pool, slot, layer=0):
    """The slot's self-attention keys from its first column to the last written one."""
    return pool._self_k[layer][slot, 0, pool.start[slot]:pool.hi, 0].tolist()


def test_admit_takes_free_slots_and_records_starts_and_sources():
    pool = SlotCache(4)
    assert pool.free_slots() == [0, 1, 2, 3] and pool.extent == 0
    admit(pool, [0, 1], source=5, lengths=[5, 2])
    assert pool.active == [0, 1] and pool.free_slots() == [2, 3] and pool.extent == 2
    assert pool.start == {0: 0, 1: 0} and pool.source == {0: 5, 1: 2}
    assert pool._cross_valid[1].tolist() == [True, True, False, False, False]
    step(pool, lambda slot: 100 + slot)
    admit(pool, [3], source=5, tag=3)  # joins later: starts at the column the next step writes
    assert pool.start[3] == 1 and pool.free_slots() == [2] and pool.extent == 4
    assert torch.equal(pool._cross_k[1][3], cross(1, 5, 3)[0][1][0])
    self_mask, cross_mask = step(pool, lambda slot: 200 + slot)
    assert self_mask.shape == (4, 2)
    assert self_mask[0].tolist() == [True, True] and self_mask[3].tolist() == [False, True]
    assert cross_mask[2, 0] and not cross_mask[2, 1:].any()  # the idle slot reads one position, stays finite
    assert live_keys(pool, 0) == [100, 200] and live_keys(pool, 3) == [203]


def test_retire_frees_the_slot_without_copying():
    pool = SlotCache(3)
    admit(pool, [0, 1, 2])
    step(pool, lambda slot: slot + 1)
    before = [t.clone() for t in pool._self_k + pool._cross_k]
    pointers = [t.data_ptr() for t in pool._self_k + pool._cross_k]
    pool.retire(1)
    assert pool.active == [0, 2] and pool.free_slots() == [1] and 1 not in pool.source
    after = pool._self_k + pool._cross_k
    assert [t.data_ptr() for t in after] == pointers
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    pool.retire(0)
    pool.retire(2)
    assert pool.free_slots() == [0, 1, 2] and pool.lo == 0


def test_compact_moves_only_the_highest_rows_and_keeps_their_data():
    pool = SlotCache(6)
    admit(pool, [0, 1, 2, 3, 4], tag=0, source=4, lengths=[4, 3, 2, 1, 4])
    step(pool, lambda slot: 10 + slot)
    step(pool, lambda slot: 20 + slot)
    own = {slot: (live_keys(pool, slot), [t[slot].clone() for t in pool._cross_k + pool._cross_v],
                  pool._cross_valid[slot].clone(), pool.source[slot]) for slot in pool.active}
    pool.retire(0)
    pool.retire(2)
    moves = pool.compact()
    assert moves == {4: 0, 3: 2}  # the highest rows into the lowest free slots; slot 1 stays
    assert pool.active == [0, 1, 2] and pool.extent == 3
    for new, old in [(0, 4), (1, 1), (2, 3)]:
        keys, crosses, valid, source = own[old]
        assert live_keys(pool, new) == keys
        assert all(torch.equal(t[new], c) for t, c in zip(pool._cross_k + pool._cross_v, crosses))
        assert torch.equal(pool._cross_valid[new], valid) and pool.source[new] == source
    assert pool.compact() == {}  # nothing idle below the highest row: nothing moves
    self_mask, _ = step(pool, lambda slot: 30 + slot)
    assert self_mask.shape[0] == 3
    assert live_keys(pool, 0) == [14, 24, 30] and live_keys(pool, 2) == [13, 23, 32]


def test_window_shifts_to_the_front_when_hi_reaches_the_capacity():
    pool = SlotCache(2, initial_length=8)
    admit(pool, [0])
    for t in range(5):
        step(pool, lambda slot, t=t: 100 + t if slot == 0 else -1)
    admit(pool, [1], tag=1)  # starts at column 5
    pool.retire(0)  # columns 0..4 are dead now
    for t in range(5, 8):
        step(pool, lambda slot, t=t: 100 + t)
    assert pool.hi == 8 == pool.length and pool.lo == 5
    assert live_keys(pool, 1) == [105, 106, 107]
    self_mask, _ = step(pool, lambda slot: 108)  # no room for column 8: the live window moves to the front
    assert pool.length == 8 and pool.lo == 0 and pool.start[1] == 0 and pool.hi == 4
    assert live_keys(pool, 1) == [105, 106, 107, 108]
    assert live_keys(pool, 1, layer=1) == [106, 107, 108, 109]
    assert pool._self_v[0][1, 0, :4, 0].tolist() == [105.5, 106.5, 107.5, 108.5]
    assert self_mask.shape == (2, 4) and self_mask[1].all()  # slot 0 idles (reads its own junk)


def test_columns_double_when_the_live_window_is_too_long_to_shift():
    pool = SlotCache(2, initial_length=4)
    admit(pool, [0])
    for t in range(4):
        step(pool, lambda slot, t=t: 100 + t)
    self_mask, _ = step(pool, lambda slot: 104)
    assert pool.length == 8 and pool.hi == 5
    assert live_keys(pool, 0) == [100, 101, 102, 103, 104] and self_mask[0].all()


def test_a_longer_newcomer_grows_the_cross_length_keeping_old_rows():
    pool = SlotCache(3)
    admit(pool, [0, 1], source=3, tag=0, lengths=[3, 2])
    old = [t[:2].clone() for t in pool._cross_k + pool._cross_v]
    step(pool, lambda slot: 1)
    admit(pool, [2], source=6, tag=2, lengths=[5])
    assert pool._cross_valid.shape[1] == 6 and all(t.shape[2] == 6 for t in pool._cross_k + pool._cross_v)
    for grown, was in zip(pool._cross_k + pool._cross_v, old):
        assert torch.equal(grown[:2, :, :3], was)
    assert pool._cross_valid[:2].tolist() == [[True] * 3 + [False] * 3, [True] * 2 + [False] * 4]
    assert pool.source == {0: 3, 1: 2, 2: 5}
    cache, _self_mask, cross_mask = pool.step()
    assert cross_mask.shape == (3, 5)  # the step reads up to the longest row's last position
    assert cache.cross_attention_cache.layers[1].keys.shape == (3, HEADS, 5, DIM)
    assert torch.equal(cache.cross_attention_cache.layers[1].keys[:2, :, :3], old[1])
    assert not cross_mask[0, 3:].any() and cross_mask[2].all()
