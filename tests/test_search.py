import math

import pytest

from layerbisect.search import bisect_calls, bisect_first_failing, first_failing


def monotone(n: int, first_bad: int | None) -> list[bool]:
    return [first_bad is None or i < first_bad for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 100, 1000])
@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_bisect_agrees_with_a_full_scan_on_monotone_checks(n, batch):
    for first_bad in [None, 0, n // 3, n - 1] if n else [None]:
        flags = monotone(n, first_bad)
        probed = []

        finals = []

        def check(indices, final):
            assert 1 <= len(indices) <= batch
            probed.extend(indices)
            finals.append(final)
            return {i: flags[i] for i in indices}

        found, calls = bisect_first_failing(check, n, batch)
        assert finals.count(True) <= 1 and True not in finals[:-1]
        assert found == first_failing(flags)
        assert (calls == 0) == (n == 0) and calls <= math.ceil(math.log(max(n, 2)) / math.log(batch + 1)) + 2
        assert len(probed) == len(set(probed))  # nothing measured twice


def test_bad_arguments():
    with pytest.raises(ValueError):
        bisect_first_failing(lambda i, final: {}, 5, batch=0)


@pytest.mark.parametrize("batch,probes", [(1, 1), (2, 1), (8, 1), (3, 3), (1, 2)])
def test_bisect_calls_is_the_most_calls_any_answer_takes(batch, probes):
    for n in range(130):
        calls = [bisect_first_failing(lambda ks, final, flags=monotone(n, first_bad): {k: flags[k] for k in ks},
                                      n, batch, probes)[1] for first_bad in [None, *range(n)]]
        assert max(calls) == bisect_calls(n, batch, probes)  # reached, never passed
    assert bisect_calls(1000, 8, 1) == 8 and bisect_calls(1000, 1, 1) == 10
