"""Data parallelism with torch.distributed: two gloo ranks on the CPU against one process.

One module-scoped fixture spawns two ranks once (``torch.multiprocessing.spawn``, a ``file://`` rendezvous in a
temporary folder, loopback only); they run every scenario and save what they saw, and the tests compare that
with the same computations done here, in the parent, without a process group.

The ranks' trajectories are checkpointed halfway (``save_checkpoint``, then a ``Checkpointer`` saving at every
step, passed to ``integrate`` through ``SaveAt``); the parent resumes the halfway checkpoint in one process and
finishes the run.
"""

from __future__ import annotations

import datetime
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from exponential_euler_solver import (
    AdaptiveGradientDescent,
    Checkpointer,
    ExponentialEulerSolver,
    GaussNewtonOperator,
    HessianOperator,
    LossFunction,
    RankDivergenceError,
    SaveAt,
    Stop,
    Trajectory,
    integrate,
    load_checkpoint,
    resume,
    save_checkpoint,
)
from exponential_euler_solver.distributed import is_main_process, main_process_decides, parameter_checksum, shard_range

from conftest import assert_close_normwise

WORLD_SIZE = 2
N_TRAJECTORY = 21  # not divisible by the world size: shards of 11 and 10
N_STEPS = 20
N_CHECKPOINT = 10  # the ranks write a checkpoint after this many steps; the parent resumes it
# float32 runs; the ranks sum in a different order than one process. The multistep scheme's error estimate is a
# second difference of gradients, about a hundred times smaller than the gradients here, so their rounding
# differences reach its step sizes a hundred times amplified: 2.2e-5 relative was seen in dt.
TRAJECTORY_RTOL = 1e-4
SOLVERS = ("exponential_euler", "adaptive_gd")


# ----------------------------------------------------------------------------------------------------------------
# problems, built identically in the ranks and in the parent
def _trajectory_loss(**kwargs) -> LossFunction:
    """float32 MLP 5 -> 8 -> tanh -> 3 (75 parameters) on 21 seeded examples."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAJECTORY, 5, generator=gen)
    y = torch.randint(0, 3, (N_TRAJECTORY,), generator=gen)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return LossFunction(TensorDataset(X, y), nn.CrossEntropyLoss(), net, **kwargs)


def _make_solver(name: str, params, loss, **kwargs):
    if name == "exponential_euler":
        return ExponentialEulerSolver(params, loss, max_step_size=5.0, stiff_dim=2, **kwargs)
    return AdaptiveGradientDescent(params, loss, lr=5.0, **kwargs)


def _run_trajectory(name: str, init_seed: int, folder: str | None = None, **solver_kwargs) -> dict:
    """N_STEPS steps from the seeded problem. With ``folder`` (the ranks): ``integrate`` keeping the parameters at
    every step, ``save_checkpoint(folder/resume.pt)`` after N_CHECKPOINT steps, and the rest integrated with a
    Checkpointer saving to folder/every.pt at every step (and at the end). Without (the parent's uninterrupted
    reference): plain ``solver.step()`` calls."""
    loss = _trajectory_loss()
    torch.manual_seed(init_seed)  # differs across ranks: initialize_parameters must broadcast rank 0's
    params = loss.initialize_parameters()
    solver = _make_solver(name, params, loss, **solver_kwargs)
    out = {}
    if folder is None:
        kept = [params.clone()]
        reports = []
        for _ in range(N_STEPS):
            reports.append(solver.step())
            kept.append(params.clone())
        columns = {key: torch.tensor([getattr(r, key) for r in reports], dtype=torch.float64)
                   for key in ("loss", "new_loss", "dt")}
    else:
        os.makedirs(folder, exist_ok=True)
        trajectory = integrate(solver, Stop(steps=N_CHECKPOINT), SaveAt(every_n=1))
        path = os.path.join(folder, "resume.pt")
        save_checkpoint(path, solver, trajectory)
        # save_checkpoint returns after its barrier: rank 0's file is complete, and every rank can read it.
        out["read_back"] = torch.equal(load_checkpoint(path)["solver"]["params"], params)
        checkpointer = Checkpointer(os.path.join(folder, "every.pt"), every_seconds=0)
        integrate(solver, Stop(steps=N_STEPS), SaveAt(checkpoint=checkpointer), trajectory=trajectory)
        out["n_saves"] = checkpointer.n_saves
        kept = trajectory.params
        columns = {"loss": trajectory.loss, "new_loss": trajectory.new_loss, "dt": trajectory.dt}
    return {**out, **columns, "params": params.clone(), "kept": kept, "n_hvp": solver.n_hvp, "n_grad": solver.n_grad,
            "bytes": None if loss.data_parallel is None else loss.data_parallel.bytes_all_reduced}


class _MapDataset(Dataset):
    """A map-style dataset that is not a TensorDataset (the DataLoader path)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _quantity_losses(**kwargs) -> dict[str, LossFunction]:
    """float64 losses on 3 examples (shards 2 and 1), on 1 example (rank 1 has none), and 5 examples through a
    DataLoader with batches of 2."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()  # 27 parameters
    crit = nn.CrossEntropyLoss()
    return {"three": LossFunction(TensorDataset(X[:3], y[:3]), crit, net, **kwargs),
            "one": LossFunction(TensorDataset(X[:1], y[:1]), crit, net, **kwargs),
            "loader": LossFunction(_MapDataset(X, y), crit, net, batch_size=2, **kwargs)}


def _quantities(loss: LossFunction) -> dict:
    gen = torch.Generator().manual_seed(9)
    theta = torch.randn(loss.n_params, generator=gen, dtype=torch.float64)
    V = torch.randn(loss.n_params, 3, generator=gen, dtype=torch.float64)
    value, g = loss.gradient(theta)
    return {"forward": loss.forward(theta), "loss": value, "grad": g, "hvp": HessianOperator(loss, theta) @ V,
            "hvp1": HessianOperator(loss, theta) @ V[:, 0], "gnvp": GaussNewtonOperator(loss, theta) @ V}


# ----------------------------------------------------------------------------------------------------------------
# the ranks
def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {"trajectories": {name: _run_trajectory(name, init_seed=100 + rank,
                                                      folder=os.path.join(out_dir, "checkpoints", name),
                                                      check_every=1)
                                for name in SOLVERS}}

        losses = _quantity_losses()
        out["shards"] = {k: lf.data_parallel.shard for k, lf in losses.items()}
        out["quantities"] = {}
        out["counts"] = {}
        for key, loss in losses.items():
            out["quantities"][key] = _quantities(loss)
            out["counts"][key] = (loss.data_parallel.n_all_reduces, loss.data_parallel.bytes_all_reduced)
        local = _quantity_losses(distributed=False)["three"]
        out["local_is_none"] = local.data_parallel is None
        out["local"] = _quantities(local)

        # Rank 1 moves one parameter by one ulp; the next checked step must raise on every rank.
        loss = _trajectory_loss()
        params = loss.initialize_parameters()
        solver = _make_solver("adaptive_gd", params, loss, check_every=2)
        solver.step()
        if rank == 1:
            params[3] = torch.nextafter(params[3], torch.tensor(float("inf")))
        solver.step()  # step 1: not checked
        try:
            solver.step()  # step 2: checked
            out["divergence"] = None
        except RankDivergenceError as exc:
            out["divergence"] = {"message": str(exc), "step": exc.step, "t": exc.t}
        out["decided"] = main_process_decides(rank == 0)
        out["is_main"] = is_main_process()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(WORLD_SIZE, str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    out = []
    for rank in range(WORLD_SIZE):
        with open(tmp / f"rank{rank}.pkl", "rb") as f:
            out.append(pickle.load(f))
        out[-1]["checkpoints"] = tmp / "checkpoints"
    return out


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    """The uninterrupted single-process runs the ranks are compared with (rank 0's initial seed)."""
    return {name: _run_trajectory(name, init_seed=100) for name in SOLVERS}


# ----------------------------------------------------------------------------------------------------------------
# two ranks against one process
def _assert_rel(actual, expected, rtol: float, what: str) -> None:
    err = (actual - expected).abs() / expected.abs().clamp_min(1e-300)
    worst = int(err.argmax())
    assert float(err.max()) <= rtol, (f"{what}: relative error {float(err.max()):.3e} > {rtol:.0e} at step "
                                      f"{worst}: {float(actual[worst]):.9g} vs single-process "
                                      f"{float(expected[worst]):.9g}")


@pytest.mark.parametrize("name", SOLVERS)
def test_two_ranks_follow_the_single_process_trajectory(ranks, single_process, name):
    expected = single_process[name]
    for rank, result in enumerate(ranks):
        got = result["trajectories"][name]
        for key in ("loss", "new_loss", "dt"):
            _assert_rel(got[key], expected[key], TRAJECTORY_RTOL, f"{name} rank {rank} {key}")
        assert_close_normwise(got["params"], expected["params"], TRAJECTORY_RTOL, f"{name} rank {rank} params")
        assert (got["n_grad"], got["n_hvp"]) == (expected["n_grad"], expected["n_hvp"]), \
            f"{name} rank {rank}: (n_grad, n_hvp) {(got['n_grad'], got['n_hvp'])} != single-process " \
            f"{(expected['n_grad'], expected['n_hvp'])}"
    # The ranks see identical reduced values, so they stay bit-identical (the per-step check passed too).
    a, b = (r["trajectories"][name]["params"] for r in ranks)
    assert torch.equal(a, b), f"{name}: ranks differ by {float((a - b).abs().max()):.3e}"


@pytest.mark.parametrize("name", SOLVERS)
def test_checkpoint_written_under_two_ranks_resumes_in_one_process(ranks, single_process, name):
    folder = ranks[0]["checkpoints"] / name
    # One file per checkpoint path, written by rank 0: no rank-suffixed copies, no temporary files left.
    assert sorted(os.listdir(folder)) == ["every.pt", "resume.pt"], sorted(os.listdir(folder))
    for rank, result in enumerate(ranks):
        got = result["trajectories"][name]
        assert got["read_back"], f"{name} rank {rank}: the checkpoint read right after save_checkpoint " \
                                 "holds other parameters than this rank's"
        # Checkpointer(every_seconds=0) under 2 ranks: both ranks took every save (and nothing hung): one per
        # step, and the one integrate makes at the end (save_at_end).
        assert got["n_saves"] == N_STEPS - N_CHECKPOINT + 1, f"{name} rank {rank}: {got['n_saves']} saves"
    two_ranks = ranks[0]["trajectories"][name]
    last = load_checkpoint(folder / "every.pt")
    assert last["solver"]["n_steps"] == N_STEPS and torch.equal(last["solver"]["params"], two_ranks["params"])
    assert len(Trajectory.from_dict(last["trajectory"])) == N_STEPS

    # Resume in this process (no process group) into a fresh solver and finish the run.
    assert not dist.is_initialized()
    loss = _trajectory_loss()
    torch.manual_seed(7)
    params = loss.initialize_parameters()
    solver = _make_solver(name, params, loss)
    trajectory = Trajectory()
    resume(folder / "resume.pt", solver, trajectory)
    assert (solver.n_steps, len(trajectory), trajectory.every_n) == (N_CHECKPOINT, N_CHECKPOINT, 1)
    assert torch.equal(params, two_ranks["kept"][N_CHECKPOINT])
    integrate(solver, Stop(steps=N_STEPS), trajectory=trajectory)
    assert trajectory.stop_reason == "max_steps"
    assert solver.n_steps == N_STEPS and loss.data_parallel is None
    resumed = {"loss": trajectory.loss, "new_loss": trajectory.new_loss, "dt": trajectory.dt}
    for key, values in resumed.items():  # the first steps come from the file, bit for bit
        assert torch.equal(values[:N_CHECKPOINT], two_ranks[key][:N_CHECKPOINT]), f"{name} {key} from the file"
    assert len(trajectory.params) == N_STEPS + 1 and torch.equal(trajectory.params[-1], params)
    for ref, label in ((two_ranks, "the 2-rank run"), (single_process[name], "the uninterrupted 1-process run")):
        for key, values in resumed.items():
            _assert_rel(values, ref[key], TRAJECTORY_RTOL, f"{name} resumed {key} vs {label}")
        assert_close_normwise(params, ref["params"], TRAJECTORY_RTOL, f"{name} resumed params vs {label}")
        for step, (p, q) in enumerate(zip(trajectory.params, ref["kept"])):
            assert_close_normwise(p, q, TRAJECTORY_RTOL, f"{name} resumed params after {step} steps vs {label}")
        assert (solver.n_grad, solver.n_hvp) == (ref["n_grad"], ref["n_hvp"]), \
            f"{name}: resumed (n_grad, n_hvp) {(solver.n_grad, solver.n_hvp)} != {label}'s " \
            f"{(ref['n_grad'], ref['n_hvp'])}"


def test_quantities_match_one_process_including_an_empty_shard(ranks):
    expected = {key: _quantities(loss) for key, loss in _quantity_losses().items()}
    assert [r["shards"]["three"] for r in ranks] == [range(0, 2), range(2, 3)]
    assert [r["shards"]["one"] for r in ranks] == [range(0, 1), range(1, 1)]
    for rank, result in enumerate(ranks):
        for key, values in expected.items():
            for what, ref in values.items():
                assert_close_normwise(result["quantities"][key][what], ref, 1e-12, f"rank {rank} {key} {what}")
        # distributed=False inside a group: the whole dataset, no communication
        assert result["local_is_none"]
        for what, ref in expected["three"].items():
            assert torch.equal(result["local"][what], ref), f"rank {rank} distributed=False {what} differs"


def test_one_all_reduce_per_returned_quantity(ranks):
    P, m = 27, 3
    # forward 1 value; gradient packs loss and gradient; the Hessian operator's (P, m) block and single vector;
    # the Gauss-Newton operator's (P, m) block; float64; one all-reduce each
    expected = (5, 8 * (1 + (1 + P) + P * m + P + P * m))
    for rank, result in enumerate(ranks):
        for key, counts in result["counts"].items():
            assert counts == expected, f"rank {rank} {key}: (all-reduces, bytes) {counts} != {expected}"


def test_divergence_check_raises_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        div = result["divergence"]
        assert div is not None, f"rank {rank}: a one-ulp difference between the ranks was not detected"
        assert div["step"] == 2 and "differ across the 2 ranks" in div["message"], div


def test_rank_zero_decides_and_is_the_main_process(ranks):
    assert [r["decided"] for r in ranks] == [True, True]
    assert [r["is_main"] for r in ranks] == [True, False]


# ----------------------------------------------------------------------------------------------------------------
# without a process group
@pytest.mark.parametrize("n, world_size", [(21, 2), (1, 2), (0, 3), (10, 4), (7, 7), (3, 5)])
def test_shards_cover_every_example_once(n, world_size):
    shards = [shard_range(n, rank, world_size) for rank in range(world_size)]
    assert [i for s in shards for i in s] == list(range(n)), shards
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_shard_range_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)


def test_no_group_means_no_data_parallel():
    assert not dist.is_initialized()
    assert is_main_process() and main_process_decides(False) is False
    assert _trajectory_loss().data_parallel is None
    with pytest.raises(ValueError, match="distributed=True needs an initialised default process group"):
        _trajectory_loss(distributed=True)
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        _trajectory_loss(distributed="yes")


def test_check_every_is_validated():
    loss = _trajectory_loss()
    with pytest.raises(ValueError, match="check_every must be a non-negative int; got -1"):
        _make_solver("adaptive_gd", loss.initialize_parameters(), loss, check_every=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_checksum_sees_one_ulp(dtype):
    x = torch.randn(50, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = x.clone()
    y[17] = torch.nextafter(y[17], torch.tensor(float("inf"), dtype=dtype))
    assert int(parameter_checksum(x)) == int(parameter_checksum(x.clone()))
    assert int(parameter_checksum(x)) != int(parameter_checksum(y))
