"""BlockQueue (csrc/common/block_queue.h), the work sharing of the CPU GEMV's threads: every
block is taken exactly once whatever the timing; a thread takes its own range front to back,
then steals the last blocks of the others' back to front."""

import pytest

import fastloss


def ranges(count, threads):
    return [range(count * t // threads, count * (t + 1) // threads) for t in range(threads)]


@pytest.mark.parametrize("count,threads", [(0, 2), (1, 3), (5, 8), (37, 2), (129, 3), (1000, 4), (7, 1)])
def test_every_block_taken_once(count, threads):
    takes = fastloss._C._block_queue_takes(count, threads)
    assert len(takes) == count
    assert all(len(t) == 3 for t in takes), "a block taken twice, or never"
    for t, own in enumerate(ranges(count, threads)):
        by_t = sorted((takes[b][1], b) for b in own if takes[b][0] == t)
        # the owner's blocks: marked its own, a prefix of its range, in order
        assert [b for _, b in by_t] == list(own)[:len(by_t)]
        assert all(takes[b][2] == 1 for _, b in by_t)
    for b, (t, _, own) in enumerate(takes):
        assert own == (b in ranges(count, threads)[t]), b


@pytest.mark.parametrize("threads", [2, 3])
def test_a_held_thread_is_stolen_from_back_to_front(threads):
    count = 16 * threads
    # thread 0 takes its first block and waits until the others find nothing left: they take
    # the rest of its range from the back, one block at a time
    takes = fastloss._C._block_queue_takes(count, threads, hold_first=True)
    assert all(len(t) == 3 for t in takes)
    first = ranges(count, threads)[0]
    assert takes[first[0]][:2] == [0, 0]
    stolen = list(first)[1:]
    assert all(takes[b][0] != 0 and takes[b][2] == 0 for b in stolen)
    for t in range(1, threads):  # each thief's steals in falling block order
        mine = [b for b in stolen if takes[b][0] == t]
        assert sorted(mine, key=lambda b: takes[b][1]) == sorted(mine, reverse=True)
    if threads == 2:
        assert [takes[b][1] for b in reversed(stolen)] == list(range(16, 31)), "after its own 16"


def test_many_threads_every_block_once():
    for _ in range(20):  # claims racing on 2 cores: still each block once
        takes = fastloss._C._block_queue_takes(997, 8)
        assert all(len(t) == 3 for t in takes)


def test_count_out_of_range_is_refused():
    with pytest.raises(ValueError, match="count"):
        fastloss._C._block_queue_takes(1 << 32, 2)
