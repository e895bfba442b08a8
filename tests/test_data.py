"""The prompt stream: same order on every rank, disjoint slices, resumable, epoch wrap."""

import pytest

from gpg_vl.data import PromptStream


def test_ranks_take_disjoint_slices_of_the_same_global_batch():
    streams = [PromptStream(40, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        a, b = (s.next_local() for s in streams)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    single = PromptStream(40, 8, seed=3)
    streams = [PromptStream(40, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert single.next_local() == streams[0].next_local() + streams[1].next_local()


def test_epoch_covers_every_row_once_then_reshuffles():
    s = PromptStream(16, 4, seed=0)
    first = [i for _ in range(4) for i in s.next_local()]
    assert sorted(first) == list(range(16))
    second = [i for _ in range(4) for i in s.next_local()]
    assert sorted(second) == list(range(16)) and second != first
    assert s.epochs_done == 2.0


def test_resume_restores_the_position():
    a = PromptStream(30, 4, seed=1)
    for _ in range(9):
        a.next_local()
    b = PromptStream(30, 4, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_local() for _ in range(6)] == [b.next_local() for _ in range(6)]


def test_resume_with_other_settings_is_refused():
    a = PromptStream(30, 4, seed=1)
    with pytest.raises(ValueError, match="global_batch"):
        PromptStream(30, 6, seed=1).load_state_dict(a.state_dict())


def test_too_few_rows_is_explained():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptStream(3, 4, seed=0)
