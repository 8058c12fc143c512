"""fastjac.training: exact resumption, DDP (2 gloo processes under torchrun) against one
process on the same global batches, checkpoints refused when truncated or corrupted, data
loaders and their errors, the `fastjac train` command."""
import dataclasses
import gzip
import json
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import tiny_train_config
from fastjac.cli import main
from fastjac.training import BatchOrder, CheckpointError, TrainConfig, load_checkpoint, load_dataset, train
from fastjac.training.checkpoint import save_checkpoint
from fastjac.training.trainer import CHECKPOINT, build_model

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU run fastest (and deterministically) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(out, **changes):
    return tiny_train_config(out, **changes)


def _parameters(out):
    return load_checkpoint(Path(out) / CHECKPOINT)["model"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("model,dataset", [("grae", "digits"), ("beta-vae", "digits"), ("grae", "mnist")])
def test_run_killed_after_a_checkpoint_and_resumed_ends_like_an_uninterrupted_run(tmp_path, model, dataset):
    # mnist: the App. D conv nets (tiny width) on synthetic IDX images, BatchNorm buffers included
    _idx(tmp_path / "t10k-images-idx3-ubyte", np.random.default_rng(0).integers(0, 256, (64, 28, 28)))
    options = dict(model=model, dataset=dataset, data_dir=str(tmp_path), block_size=2, log_every=3,
                   width=0.125 if dataset == "digits" else 1 / 32)
    train(_config(tmp_path / "whole", **options))

    def kill(step, _):
        if step == 4:  # one step past the checkpoint of step 3: its work is lost
            raise Killed

    with pytest.raises(Killed):
        train(_config(tmp_path / "parts", **options), on_step=kill)
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT)["step"] == 3
    train(_config(tmp_path / "parts", resume=True, **options))
    whole, parts = _parameters(tmp_path / "whole"), _parameters(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k
    if dataset == "mnist":  # the decoder's running statistics were updated (and resumed) too
        assert any(k.startswith("decoder") and k.endswith("running_mean") and bool(whole[k].any()) for k in whole)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "parts")]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]]  # no duplicated steps
    assert [e.get("train") for e in logs[0]] == [e.get("train") for e in logs[1]]


def test_resume_refuses_another_configuration_and_a_fresh_run_refuses_an_existing_one(tmp_path):
    train(_config(tmp_path, steps=3))
    with pytest.raises(ValueError, match="beta=0.5 .now 0.7."):
        train(_config(tmp_path, steps=6, beta=0.7, resume=True))
    with pytest.raises(ValueError, match="--resume"):
        train(_config(tmp_path, steps=6))
    train(_config(tmp_path, steps=4, resume=True, log_every=1))  # --steps may grow
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4


def test_truncated_or_corrupted_checkpoint_is_refused_and_nothing_is_loaded(tmp_path):
    train(_config(tmp_path, steps=3))
    path = tmp_path / CHECKPOINT
    good = path.read_bytes()
    cases = {"truncated": good[: len(good) // 2], "corrupted": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:],
             "not a fastjac checkpoint": b"PK\x03\x04 some zip"}
    for message, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=message):
            train(_config(tmp_path, steps=6, resume=True))
    # a well-formed checkpoint of another model is refused before any tensor is copied
    path.write_bytes(good)
    state = load_checkpoint(path)
    state["model"].pop(next(iter(state["model"])))
    save_checkpoint(state, path)
    model = build_model(_config(tmp_path), (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from fastjac.training.trainer import _check_resumable
    with pytest.raises(CheckpointError, match="does not match"):
        _check_resumable(load_checkpoint(path), _config(tmp_path), model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries behind


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train(cfg)


def test_two_gloo_processes_match_one_process_on_the_same_global_batches(tmp_path):
    # batch 15 splits 8 / 7: the per-sample terms must be weighted by the global batch, not averaged
    # per process. Forked workers (no second torch import); `torchrun` runs the same code path.
    ddp = _config(tmp_path / "ddp", estimator="exact", latent_dim=3, steps=4, batch_size=15, checkpoint_every=4,
                  eval_size=10)
    train(dataclasses.replace(ddp, out=str(tmp_path / "one")))  # first: the workers inherit its imports
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), ddp), nprocs=2,
                                          start_method="fork")
    one, two = _parameters(tmp_path / "one"), _parameters(tmp_path / "ddp")
    for k in one:
        err = float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12))
        assert err < 1e-5, f"{k}: relative difference {err:.2e}"
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "ddp")]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]]
    for a, b in zip(logs[0], logs[1]):  # logged terms are reduced over processes, then averaged
        for k, v in (a.get("train") or {}).items():
            assert abs(v - b["train"][k]) <= 1e-4 * abs(v) + 1e-6, k


def test_batch_order_splits_each_global_batch_over_processes():
    whole = BatchOrder(50, 12, seed=3)
    parts = [BatchOrder(50, 12, seed=3, rank=r, world=3) for r in range(3)]
    for step in (0, 3, 4, 9):
        assert torch.equal(whole.indices(step), torch.cat([p.indices(step) for p in parts]))
    epoch = torch.cat([whole.indices(s) for s in range(4)])
    assert len(set(epoch.tolist())) == 48  # a permutation: no index twice in an epoch
    assert not torch.equal(whole.indices(0), whole.indices(4))  # a new order each epoch
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(10, 20, seed=0)


def _idx(path, images, magic=0x00000803):
    raw = struct.pack(">IIII", magic, len(images), 28, 28) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def test_mnist_idx_files_are_read_and_bad_ones_named(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    data = load_dataset("mnist", data_dir=tmp_path)
    assert (len(data.train), len(data.test)) == (3, 3)
    assert torch.equal(data.test.batch(torch.tensor([0])), torch.tensor(images[3:4], dtype=torch.float32)[:, None] / 255)
    _idx(tmp_path / "train-images-idx3-ubyte", images[:4])
    assert len(load_dataset("mnist", data_dir=tmp_path).train) == 4  # raw (not gzipped) train file
    (tmp_path / "train-images-idx3-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is truncated"):
        load_dataset("mnist", data_dir=tmp_path)
    _idx(tmp_path / "train-images-idx3-ubyte", images, magic=0x801)
    with pytest.raises(ValueError, match="not an IDX image file"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match=f"no MNIST data in {tmp_path / 'empty'}.*t10k-images-idx3-ubyte"):
        (tmp_path / "empty").mkdir()
        load_dataset("mnist", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")


def test_celeba_folder_is_center_cropped_and_resized(tmp_path):
    from PIL import Image
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(12):  # 40 wide, 20 high: the centered 20×20 square is white, the sides black
        pixels = np.zeros((20, 40, 3), dtype=np.uint8)
        pixels[:, 10:30] = 255
        Image.fromarray(pixels).save(folder / f"{i:06d}.{'jpg' if i % 2 else 'png'}")
    data = load_dataset("celeba", data_dir=tmp_path)
    assert (len(data.train), len(data.test), data.shape) == (11, 1, (3, 64, 64))
    x = data.train.batch(torch.tensor([0, 2]))  # png files: exact pixels
    assert x.shape == (2, 3, 64, 64) and float(x.min()) == 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0 image.*empty: expected a folder of face images"):
        load_dataset("celeba", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="missing is not a folder"):
        load_dataset("celeba", data_dir=tmp_path / "missing")
    (folder / "000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="000001.jpg"):
        load_dataset("celeba", data_dir=tmp_path).train.batch(torch.tensor([1]))


def test_train_command_writes_log_grid_and_checkpoint(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "run"
    assert main(["train", "--model", "beta-vae", "--block-size", "2", "--latent-dim", "4", "--width", "0.125",
                 "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--eval-size", "8",
                 "--eval-samples", "2", "--log-every", "1", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "s/step" in printed.out and "Taylor" in printed.out
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 2] and set(entries[-1]["eval"]) == {
        "beta_vae", "beta_vae_stderr", "taylor", "grae"}
    assert entries[-1]["eval"]["taylor"] >= entries[-1]["eval"]["grae"] - 1e-3
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 8 * 32 and grid.size[1] > 4 * 32
    assert json.loads((out / "config.json").read_text())["model"] == "beta-vae"
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path / "m")]) == 2
    assert "--data-dir" in capsys.readouterr().err
