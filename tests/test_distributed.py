"""DDP through torchrun on the CPU (gloo): sharding, identical ranks, rank-0-only output, failure, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fastloader.loaders import ShardedOrder
from train.config import build_config
from train.loop import fit
from train.run import RunDir

from .test_train import tiny

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parent.parent


class FakeLoader:
    def __init__(self, n: int, seed: int):
        self.indices, self.seed = np.arange(n, dtype="uint64"), seed


def shards(n: int, world: int, batch: int, shuffle: bool, tail: str, epoch: int = 3) -> list[np.ndarray]:
    return [ShardedOrder(r, world, batch, shuffle, tail)(FakeLoader(n, 7)).sample_order(epoch) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_each_step_of_k_ranks_is_the_single_process_global_batch(world):
    batch = 12
    single = np.random.default_rng(7 + 3).permutation(np.arange(100, dtype="uint64"))  # FFCV's own Random order
    ranks = shards(100, world, batch, shuffle=True, tail="drop")
    share = batch // world
    for step in range(100 // batch):
        together = np.concatenate([r[step * share:(step + 1) * share] for r in ranks])
        assert sorted(together) == sorted(single[step * batch:(step + 1) * batch])
    assert len({len(r) for r in ranks}) == 1


def test_shards_are_disjoint_and_cover_the_split_for_evaluation():
    ranks = shards(101, 2, 10, shuffle=False, tail="split")
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert sorted(np.concatenate(ranks)) == list(range(101))


def test_padded_training_tail_gives_every_rank_the_same_number_of_samples():
    ranks = shards(101, 2, 10, shuffle=True, tail="pad")
    assert len(ranks[0]) == len(ranks[1]) == 51
    assert set(np.concatenate(ranks)) == set(range(101))


def test_sync_bn_converts_under_a_process_group_and_is_refused_on_the_cpu(monkeypatch):
    from beton.errors import UserError
    from train import distributed
    from train.models import count_parameters, create_model
    from train.config import ModelConfig

    model = create_model(ModelConfig(name="fastnet"), num_classes=10)
    assert distributed.sync_batchnorm(model, torch.device("cpu")) is model  # one process: nothing to sync
    monkeypatch.setattr(distributed, "current", lambda: distributed.World(0, 0, 2))
    synced = distributed.sync_batchnorm(model, torch.device("cuda"))
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    assert count_parameters(synced) == count_parameters(model)
    with pytest.raises(UserError, match="sync_bn needs CUDA"):
        distributed.sync_batchnorm(model, torch.device("cpu"))


def test_rank_loaders_read_their_shard_and_the_analysis_reads_everything(learnable_betons, monkeypatch):
    from fastloader import loaders
    from fastloader.config import DataConfig

    cfg = DataConfig(beton_dir=str(learnable_betons), batch_size=50, workers=1, augment=[])
    monkeypatch.setattr(loaders, "_world", lambda: (1, 2))  # rank 1 of 2
    shard = loaders.build_loader(cfg, "test", shard=True)
    whole = loaders.build_loader(cfg, "test", shard=False)
    seen = [idx.tolist() for _, _, idx in shard.batches()]
    assert shard.batch_size == 25  # its half of each global batch of 50
    assert sorted(sum(seen, [])) == [i for i in range(200) if i % 50 >= 25]
    assert sorted(sum((idx.tolist() for _, _, idx in whole.batches()), [])) == list(range(200))


def torchrun(record: Path, args: list[str], env: dict | None = None, timeout: float = 300):
    """`fastcifar` ARGS in 2 processes under torchrun; returns (returncode, output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(record), "--", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def ddp_config(betons) -> dict:
    # GroupNorm normalises each sample alone, so 2 ranks x 50 compute what 1 process x 100 does
    return tiny(betons, model__norm="layer", train__precision="fp32", train__epochs=2, train__dist_timeout=60,
                data__subset=200, data__test_subset=100, data__workers=1)


@pytest.mark.slow
def test_two_ranks_fail_together_resume_and_match_one_process(learnable_betons, tmp_path, whole_machine):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(ddp_config(learnable_betons)))
    run = tmp_path / "run"

    # 1. rank 1 crashes at the start of epoch 2: the whole job ends, non-zero, soon
    code, out, _ = torchrun(tmp_path / "rec1", ["train", str(config), "--out", str(run), "--no-analyze"],
                            env={"FAIL_RANK": "1", "FAIL_EPOCH": "1"})
    ended = time.time()
    assert code != 0, out
    assert ended - float((tmp_path / "rec1" / "failed_at").read_text()) < 90, out
    assert "injected failure on rank 1" in out
    seen = [json.loads((tmp_path / "rec1" / f"rank{r}.json").read_text())["0"] for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(200))
    assert RunDir(run).metrics()[0]["epoch"] == 1  # epoch 1 was checkpointed before the crash

    # 2. resume under torchrun: finishes; both ranks end with the same weights
    code, out, _ = torchrun(tmp_path / "rec2", ["train", "--resume", str(run), "--no-analyze"])
    assert code == 0, out
    a, b = (torch.load(tmp_path / "rec2" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # only rank 0 wrote: one folder, each epoch's line once, the metrics file of 2 epochs
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and (p / "config.yaml").exists()] == ["run"]
    log = (run / "train.log").read_text()
    assert log.count("epoch   1/2") == 1 and log.count("epoch   2/2") == 1
    assert out.count("Test set: Average loss") == 1  # the resumed epoch, printed by rank 0 alone
    assert "over 2 processes" in log

    # 3. a single process with the same global batch and seed learns the same thing
    single = RunDir(tmp_path / "single")
    fit(build_config(ddp_config(learnable_betons)), single)
    ddp_metrics = RunDir(run).metrics()
    for d, s in zip(ddp_metrics, single.metrics(), strict=True):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-3, abs=1e-4)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-3, abs=1e-4)
        assert abs(d["test_correct"] - s["test_correct"]) <= 1 and d["test_count"] == s["test_count"] == 100
    final = torch.load(single.last, weights_only=True)["model"]
    assert all(torch.allclose(final[k], a[k], atol=1e-3, rtol=1e-3) for k in final)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_mid_epoch_and_resumes(learnable_betons, tmp_path):
    # 50 steps an epoch; the ranks agree to stop every 10, so Ctrl-C early in epoch 2 (the last) stops it at a
    # multiple of 10
    raw = tiny(learnable_betons, model__norm="layer", train__precision="fp32", train__epochs=2, data__workers=1,
               data__batch_size=20, data__test_subset=100, data__augment=[])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path / "rec"), "--", "train", str(config), "--out", str(run), "--no-analyze"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # into epoch 2
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the job gets it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert out.count("interrupted: checkpoint saved after batch") == 1, out
    assert "Traceback" not in out.split("interrupted:")[0]
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["batch"] in (10, 20, 30, 40)

    # the run continues in one process: the global batch, not the process count, defines the run
    history = fit(build_config(RunDir(run).config()), RunDir(run), resume=True)
    assert [m["epoch"] for m in history] == [1, 2]
    assert f"after batch {state['partial']['batch']} of epoch 2" in (run / "train.log").read_text()


def speed_config(betons) -> dict:
    """configs/speed94.yaml shrunk: airnet 16/32/32 wide on 200 images, its parameter roles and linear schedule,
    the whitening bias trained for epoch 1 of 2. GroupNorm, so that 2 ranks x 50 images compute what 1 process x
    100 does, and the filters on Nesterov SGD instead of Muon: torch's Muon orthogonalises in bfloat16, which
    turns the last-bit differences of a gradient averaged over ranks into 1e-2 ones. The SGD LRs are rescaled
    from the recipe's batch of 2000 to 100. The whitening bias's LR decays over both epochs, not over its one:
    had a rank not frozen it, it would move in epoch 2."""
    raw = yaml.safe_load((ROOT / "configs" / "speed94.yaml").read_text())
    raw["model"].update(norm="layer", options={"widths": [16, 32, 32]})
    raw["data"].update(beton_dir=str(betons), batch_size=100, subset=200, test_subset=100, workers=1)
    roles = raw["optimizer"]["roles"]
    roles["filters"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}
    for role in ("norm_biases", "whitening_bias", "head"):
        roles[role]["lr"] *= 100 / 2000
    raw["scheduler"]["role_epochs"] = {"whitening_bias": 2}
    raw["train"].update(epochs=2, whitening_bias_epochs=1, precision="fp32", seed=1, dist_timeout=60)
    raw["eval"] = {"tta": "none"}
    return raw


@pytest.mark.slow
def test_the_speed_recipe_freezes_its_whitening_bias_under_torchrun_as_one_process_does(
        learnable_betons, tmp_path, whole_machine):
    # DDP reduces the parameters that required grad when it was built: freezing one later failed the next step
    config = tmp_path / "speed.yaml"
    config.write_text(yaml.safe_dump(speed_config(learnable_betons)))
    code, out, _ = torchrun(tmp_path / "rec", ["train", str(config), "--out", str(tmp_path / "run"), "--no-analyze"])
    assert code == 0, out
    a, b = (torch.load(tmp_path / "rec" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)

    single = RunDir(tmp_path / "single")
    fit(build_config(speed_config(learnable_betons)), single, stop_after=1)
    bias_after_epoch_1 = torch.load(single.last, weights_only=True)["model"]["stem.whiten.bias"]
    fit(build_config(speed_config(learnable_betons)), single, resume=True)
    final = torch.load(single.last, weights_only=True)["model"]
    assert torch.equal(final["stem.whiten.bias"], bias_after_epoch_1)  # frozen for epoch 2
    assert all(torch.allclose(final[k], a[k], atol=1e-3, rtol=1e-3) for k in final)
    for d, s in zip(RunDir(tmp_path / "run").metrics(), single.metrics(), strict=True):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_sync_bn_with_a_budget_times_on_every_rank(learnable_betons, tmp_path):
    # SyncBatchNorm all-reduces in each training forward: the budget's timed steps on rank 0 alone left the other
    # rank waiting until dist_timeout (the range test's lockstep: test_range_tests_of_all_ranks_stop_at_the_same_step)
    raw = tiny(learnable_betons, model__sync_bn=True, train__precision="fp32", train__epochs=1, train__budget="1h",
               train__dist_timeout=20, data__subset=100, data__test_subset=40, data__batch_size=20, data__workers=1,
               data__augment=[])
    config = tmp_path / "sync.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, out, seconds = torchrun(tmp_path / "rec", ["train", str(config), "--out", str(tmp_path / "run"),
                                                     "--no-analyze"], env={"GLOO_SYNC_BN": "1"})
    assert code == 0, out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train.budget 1h: 1 epochs" in log
    a, b = (torch.load(tmp_path / "rec" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("running_mean") for k in a)  # BatchNorm, synchronised


def _range_test_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a range test whose rank 1 sees inputs 30x larger: alone, its loss would diverge sooner."""
    from datetime import timedelta

    import torch.distributed as dist

    from train.hardware import resolve_precision
    from train.lr_find import range_test

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(8, 3, 2, 2, generator=g) * (30.0 if rank else 1.0), torch.randint(0, 4, (8,), generator=g))
                   for _ in range(5)]
        cpu = torch.device("cpu")
        result = range_test(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), precision=resolve_precision(
            "fp32", cpu), device=cpu, start=1e-4, end=100.0, iters=80, progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result["steps"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_range_tests_of_all_ranks_stop_at_the_same_step(tmp_path):
    # each rank stopping on its own losses ran a different number of forwards: with SyncBatchNorm, a hang
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_range_test_on_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] < 80, steps
