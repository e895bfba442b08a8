"""Valid groups balanced across ranks.

alpha and beta_th count valid groups over all ranks (docs/algorithm.md), while each rank trains its own
share of the batch: exactly L = prompts_per_device * grad_accum groups (DeepSpeed's number of
micro-batches is fixed). The reference code rebuilt each rank's batch locally, so one rank
could train filler while another dropped valid groups. Here:

1. while a step collects, its valid groups are buffered up to B = L * world over all ranks,
   in an order every rank knows (round, rank, position): `buffer_share`, `join_buffer`;
2. once collected, whole groups (the encoded prompt with its pixel values, the completions,
   the rewards) move between ranks so that every rank trains L groups, valid ones first:
   `plan_moves` decides from every rank's counts, `balance_groups` moves them.

So whenever the step found B valid groups in all, no rank trains filler; valid groups are
dropped only beyond B (the step was full), never while filler is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from gpg_vl.records import Group


class Move(NamedTuple):
    """`count` whole groups sent from rank `src` to rank `dst`."""

    src: int
    dst: int
    count: int
    valid: bool  # valid groups, or invalid ones as filler


class Balanced(NamedTuple):
    groups: list[Group]  # L groups this rank trains, valid first
    sent: int  # groups this rank sent to others
    received: int  # groups this rank received from others


def buffer_share(new_valid: Sequence[int], buffered: int, capacity: int) -> list[int]:
    """How many of each rank's `new_valid` groups of a round join the step's buffer, which
    holds `buffered` over all ranks and at most `capacity`: rank order decides who comes first."""
    shares, room = [], max(0, capacity - buffered)
    for n in new_valid:
        take = min(n, room)
        shares.append(take)
        room -= take
    return shares


def join_buffer(accelerator, new_valid: int, buffered: int, capacity: int) -> tuple[int, int]:
    """How many of this rank's `new_valid` groups of a round join the step's buffer, and the
    buffer's new size over all ranks (`buffer_share` on every rank's count: a collective)."""
    counts = accelerator.gather(torch.tensor([new_valid], device=accelerator.device)).tolist()
    shares = buffer_share(counts, buffered, capacity)
    return shares[accelerator.process_index], buffered + sum(shares)


def _match(supply: list[int], demand: list[int], valid: bool) -> list[Move]:
    """Moves from ranks with supply to ranks with demand, both in rank order (both lists are
    used up in place as far as they meet)."""
    moves, s, d = [], 0, 0
    while True:
        while s < len(supply) and supply[s] == 0:
            s += 1
        while d < len(demand) and demand[d] == 0:
            d += 1
        if s == len(supply) or d == len(demand):
            return moves
        n = min(supply[s], demand[d])
        moves.append(Move(s, d, n, valid))
        supply[s] -= n
        demand[d] -= n


def plan_moves(valid: Sequence[int], filler: Sequence[int], per_rank: int) -> list[Move]:
    """The moves that give every rank `per_rank` groups, valid ones first, from the numbers of
    valid groups and of filler each rank holds. Each rank keeps up to `per_rank` of its own
    valid groups; the surplus goes to ranks with room, in rank order; the room left is filled
    with the rank's own filler, then with other ranks' spare filler. Few groups move: only
    what one rank lacks and another has to spare."""
    world = len(valid)
    if sum(valid) + sum(filler) < per_rank * world:
        raise ValueError(f"{sum(valid)} valid and {sum(filler)} invalid groups cannot give {world} ranks "
                         f"{per_rank} groups each")
    room = [max(0, per_rank - v) for v in valid]
    moves = _match([max(0, v - per_rank) for v in valid], room, valid=True)
    own = [min(f, r) for f, r in zip(filler, room)]
    room = [r - o for r, o in zip(room, own)]
    return moves + _match([f - o for f, o in zip(filler, own)], room, valid=False)


def balance_groups(accelerator, valid: list[Group], filler: list[Group], per_rank: int) -> Balanced:
    """Every rank's `per_rank` groups to train, valid first, after moving whole groups between
    ranks (`plan_moves`). A collective: every rank calls it once per step. Groups travel as
    pickled objects, point to point, one move after another in the plan's order, which every
    rank knows: each move waits only for its own two ranks, so none can deadlock."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return Balanced((valid + filler)[:per_rank], 0, 0)
    counts = accelerator.gather(torch.tensor([[len(valid), len(filler)]], device=accelerator.device)).tolist()
    moves = plan_moves([c[0] for c in counts], [c[1] for c in counts], per_rank)
    own_filler = max(0, per_rank - len(valid) - sum(m.count for m in moves if m.dst == rank and m.valid))
    outgoing = {True: valid[per_rank:], False: filler[own_filler:]}  # surplus, then spare, in order
    received: dict[bool, list[Group]] = {True: [], False: []}
    sent = 0
    for move in moves:
        if move.src == rank:
            box = [outgoing[move.valid][:move.count]]
            outgoing[move.valid] = outgoing[move.valid][move.count:]
            torch.distributed.send_object_list(box, dst=move.dst, device=accelerator.device)
            sent += move.count
        elif move.dst == rank:
            box = [None]
            torch.distributed.recv_object_list(box, src=move.src, device=accelerator.device)
            received[move.valid] += box[0]
    groups = valid[:per_rank] + received[True] + filler[:own_filler] + received[False]
    assert len(groups) == per_rank, (len(groups), per_rank)  # plan_moves gives every rank exactly per_rank
    return Balanced(groups, sent, len(received[True]) + len(received[False]))
