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


def test_a_slow_thread_is_stolen_from_back_to_front():
    count, threads = 16, 2
    # thread 0 pauses 2 ms per block: thread 1 runs out of its own range long before
    takes = fastloss._C._block_queue_takes(count, threads, slow_us=2000)
    assert all(len(t) == 3 for t in takes)
    first = ranges(count, threads)[0]
    stolen = [b for b in first if takes[b][0] == 1]
    assert stolen, "thread 1 never stole"
    assert stolen == list(first)[len(first) - len(stolen):], "steals are a suffix of the range"
    order = sorted(stolen, key=lambda b: takes[b][1])
    assert order == sorted(stolen, reverse=True), "stolen back to front"
    assert all(takes[b][2] == 0 for b in stolen)
    kept = [b for b in first if takes[b][0] == 0]
    assert kept == list(first)[:len(kept)]
