"""The memory of a block HVP does not grow with the number of examples (benchmark.memory, Linux only)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest

from exponential_euler_solver.benchmark import memory

from tables import table_rows

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")


def test_block_hvp_memory_is_bounded_by_the_batch():
    # The seed network, batches of 64, a block of 2 (the result alone: 2 x 2.6M floats = 20 MiB), at 64 and
    # 512 examples: eight times the data, the same batch, each in a fresh process.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory.main(["--n-train", "64", "512", "--batch-size", "64", "--block", "2", "--n-classes", "2"]) == 0
    _, rows = table_rows(out.getvalue(), contains="Increase")
    assert [r["# Train"] for r in rows] == ["64", "512"]
    small, large = (float(r["Increase (MiB)"]) for r in rows)
    result = float(rows[0]["Result alone (MiB)"])
    assert result == pytest.approx(2 * 2_630_000 * 4 / 2 ** 20, rel=0.01)
    assert small >= result, f"the peak rose by {small} MiB, less than the {result} MiB result it holds"
    assert large <= 2 * small, f"increase {large} MiB at n_train 512 vs {small} MiB at 64"


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        memory.main(["--block", "0"])
    assert info.value.code == 2 and "--block" in capsys.readouterr().err
