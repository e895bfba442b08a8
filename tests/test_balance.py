"""The plan that balances valid groups across ranks (pure functions; the moves themselves run
in tests/test_zero.py's skewed two-process run)."""

import random

import pytest

from gpg_vl.balance import Move, buffer_share, plan_moves


def test_the_buffer_takes_ranks_in_order_up_to_its_capacity():
    # capacity 8, empty: rank 0's 3, rank 1's 5, nothing of rank 2's
    assert buffer_share([3, 5, 2], buffered=0, capacity=8) == [3, 5, 0]
    # 6 already buffered: 2 places left, rank 0 first
    assert buffer_share([3, 5, 2], buffered=6, capacity=8) == [2, 0, 0]
    assert buffer_share([0, 4], buffered=8, capacity=8) == [0, 0]


def test_surplus_valid_groups_fill_the_rank_that_has_none():
    # rank 0 found 8 valid groups, rank 1 none: 4 move, nobody trains filler
    assert plan_moves([8, 0], [0, 4], per_rank=4) == [Move(0, 1, 4, True)]


def test_too_few_valid_groups_in_all_stay_where_they_are():
    # 4 valid in all for 8 places: rank 0 trains its 4, rank 1 its own filler; nothing moves
    assert plan_moves([4, 0], [0, 4], per_rank=4) == []


def test_a_partly_valid_rank_takes_what_it_lacks_then_its_own_filler():
    # rank 1 holds 1 valid: it takes rank 0's surplus of 2, then 1 of its own 3 filler
    assert plan_moves([6, 1], [0, 3], per_rank=4) == [Move(0, 1, 2, True)]


def test_filler_moves_only_where_a_rank_has_none_of_its_own():
    # rank 1: its 1 valid + rank 0's 1 surplus, its own 1 filler, then 1 of rank 0's spare filler
    assert plan_moves([5, 1], [3, 1], per_rank=4) == [Move(0, 1, 1, True), Move(0, 1, 1, False)]


def test_three_ranks_receive_in_rank_order():
    assert plan_moves([0, 9, 3], [4, 0, 1], per_rank=4) == [Move(1, 0, 4, True), Move(1, 2, 1, True)]


def test_too_few_groups_in_all_is_refused():
    with pytest.raises(ValueError, match="cannot give 2 ranks 4 groups"):
        plan_moves([2, 1], [1, 2], per_rank=4)


def collected(rng: random.Random, world: int, per_rank: int) -> tuple[list[int], list[int], int]:
    """What trainer.collect leaves on each rank after a few rounds of random valid counts: the
    valid groups kept (at most B in all), the last round's invalid ones, all valid generated."""
    kept, buffered, generated = [0] * world, 0, 0
    for _ in range(rng.randint(1, 4)):
        new = [rng.randint(0, per_rank) for _ in range(world)]
        shares = buffer_share(new, buffered, per_rank * world)
        kept = [k + s for k, s in zip(kept, shares)]
        buffered, generated = buffered + sum(shares), generated + sum(new)
    return kept, [per_rank - n for n in new], generated


def test_every_rank_trains_its_share_valid_first_and_filler_only_when_valid_groups_ran_out():
    rng = random.Random(0)
    for _ in range(500):
        world, per_rank = rng.randint(1, 5), rng.randint(1, 6)
        valid, filler, generated = collected(rng, world, per_rank)
        moves = plan_moves(valid, filler, per_rank)
        held_valid, held_filler = list(valid), list(filler)
        for m in moves:
            assert m.src != m.dst and m.count > 0
            (held_valid if m.valid else held_filler)[m.src] -= m.count
            (held_valid if m.valid else held_filler)[m.dst] += m.count
        assert min(held_valid) >= 0 and min(held_filler) >= 0  # nobody sends what it does not hold
        assert max(held_valid) <= per_rank and all(v + f >= per_rank for v, f in zip(held_valid, held_filler))
        # every valid group that fits is trained; with B of them in all, no rank trains filler
        assert sum(held_valid) == min(generated, per_rank * world)
        # a rank's own filler always covers what valid groups leave open: only valid groups travel
        assert all(m.valid for m in moves)
