"""The anti-replay window, case for case as wireguard-go's replay/replay_test.go.

The cases below are ported one to one from wireguard-go (MIT licence, Copyright (C) 2017-2025
WireGuard LLC), replay/replay_test.go, itself ported from the Linux kernel's WireGuard selftest;
the numbers in the comments are the test numbers there.
"""

from tunvpnd.wireguard.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayFilter

T_LIM = WINDOW_SIZE + 1
R = REJECT_AFTER_MESSAGES


def check(steps: list[tuple[int, bool]], f: ReplayFilter | None = None) -> None:
    f = f or ReplayFilter()
    for number, (counter, expected) in enumerate(steps, 1):
        got = f.validate(counter, REJECT_AFTER_MESSAGES)
        assert got == expected, f"test {number}: counter {counter} expected {expected}"


def test_constants_match_wireguard_go():
    assert WINDOW_SIZE == 8128                      # (ringBlocks - 1) * blockBits
    assert REJECT_AFTER_MESSAGES == (1 << 64) - (1 << 13) - 1


def test_replay_sequence():
    check([
        (0, True),                      # 1
        (1, True),                      # 2
        (1, False),                     # 3
        (9, True),                      # 4
        (8, True),                      # 5
        (7, True),                      # 6
        (7, False),                     # 7
        (T_LIM, True),                  # 8
        (T_LIM - 1, True),              # 9
        (T_LIM - 1, False),             # 10
        (T_LIM - 2, True),              # 11
        (2, True),                      # 12
        (2, False),                     # 13
        (T_LIM + 16, True),             # 14
        (3, False),                     # 15
        (T_LIM + 16, False),            # 16
        (T_LIM * 4, True),              # 17
        (T_LIM * 4 - (T_LIM - 1), True),    # 18
        (10, False),                    # 19
        (T_LIM * 4 - T_LIM, False),     # 20
        (T_LIM * 4 - (T_LIM + 1), False),   # 21
        (T_LIM * 4 - (T_LIM - 2), True),    # 22
        (T_LIM * 4 + 1 - T_LIM, False),     # 23
        (0, False),                     # 24
        (R, False),                     # 25
        (R - 1, True),                  # 26
        (R, False),                     # 27
        (R - 1, False),                 # 28
        (R - 2, True),                  # 29
        (R + 1, False),                 # 30
        (R + 2, False),                 # 31
        (R - 2, False),                 # 32
        (R - 3, True),                  # 33
        (0, False),                     # 34
    ])


def test_bulk_1_forward_then_zero():
    check([(i, True) for i in range(1, WINDOW_SIZE + 1)] + [(0, True), (0, False)])


def test_bulk_2_forward_from_two_then_one():
    check([(i, True) for i in range(2, WINDOW_SIZE + 2)] + [(1, True), (0, False)])


def test_bulk_3_backward():
    check([(i, True) for i in range(WINDOW_SIZE + 1, 0, -1)])


def test_bulk_4_backward_then_zero_is_too_old():
    check([(i, True) for i in range(WINDOW_SIZE + 2, 1, -1)] + [(0, False)])


def test_bulk_5_backward_then_forward():
    check([(i, True) for i in range(WINDOW_SIZE, 0, -1)] + [(WINDOW_SIZE + 1, True), (0, False)])


def test_bulk_6_backward_then_zero_then_forward():
    check([(i, True) for i in range(WINDOW_SIZE, 0, -1)] + [(0, True), (WINDOW_SIZE + 1, True)])


# -- beyond replay_test.go ---------------------------------------------------------------------

def test_reset_forgets_everything():
    f = ReplayFilter()
    check([(0, True), (5, True), (T_LIM * 3, True)], f)
    f.reset()
    check([(0, True), (5, True), (T_LIM * 3, True)], f)


def test_jump_longer_than_the_ring_clears_it_all():
    # A jump of more than 128 blocks clears each block once; nothing seen before survives as
    # a false "seen" bit within the new window.
    f = ReplayFilter()
    check([(i, True) for i in range(0, 8192, 7)], f)
    far = 10**9
    assert f.validate(far)
    assert all(f.validate(far - k) for k in range(1, WINDOW_SIZE + 1))
    assert not f.validate(far - WINDOW_SIZE - 1)


def test_limit_is_the_callers():
    f = ReplayFilter()
    assert not f.validate(10, 10)
    assert f.validate(9, 10)
    assert not f.validate(-1)           # never a u64 off the wire; refused all the same
