"""The trainer, its data loaders, DDP and the CLI attacked as a hostile world would: torn logs,
reused folders, full and read-only disks, killed runs, Ctrl-C, damaged data files, dead or stalled
peers, a killed torchrun agent, a loaded CPU, and user mistakes. Each test reproduces one attack
on tiny runs (a few steps on digits, one thread)."""
import ast
import errno
import gzip
import json
import multiprocessing
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import tiny_train_config
from fastjac.cli import _parser, main
from fastjac.training import CheckpointError, TrainConfig, load_checkpoint, load_dataset, train
from fastjac.training import data as data_module
from fastjac.training import runfolder, threads, trainer
from fastjac.training.checkpoint import save_checkpoint
from fastjac.training.errors import DataError, PeerError, RunFolderError, RunWarning, UsageError
from fastjac.training.runfolder import CHECKPOINT, CONFIG, LOG

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "grae", "--latent-dim", "4", "--width", "0.125", "--batch-size", "16", "--eval-every", "100",
        "--eval-size", "20", "--eval-samples", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(out, **changes):
    return tiny_train_config(out, **{"log_every": 1, **changes})


def _log(out):
    return [json.loads(line) for line in (Path(out) / LOG).read_text().splitlines()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Killed(Exception):
    pass


def _kill_at(step):
    def hook(s, _):
        if s == step:
            raise Killed
    return hook


# --- run folder: the checkpoint is the source of truth -------------------------------------------

def test_torn_last_log_line_is_dropped_on_resume_with_a_warning_naming_the_file(tmp_path):
    train(_config(tmp_path / "whole"))
    with pytest.raises(Killed):  # checkpoint at 3; steps 4 and 5 logged; a crash tears the line of step 5
        train(_config(tmp_path / "torn"), on_step=_kill_at(5))
    log = tmp_path / "torn" / LOG
    text = log.read_text()
    log.write_text(text[: text.rindex('"train"') + 12])  # the last line cut mid-write, no newline
    with pytest.warns(RunWarning, match=re.escape(str(log)) + ".*unreadable line.*after the checkpoint's step 3"):
        train(_config(tmp_path / "torn", resume=True))
    whole, repaired = _log(tmp_path / "whole"), _log(tmp_path / "torn")
    assert [e["step"] for e in repaired] == [e["step"] for e in whole] == [1, 2, 3, 4, 5, 6, 6]  # 6: eval
    assert [e.get("train") for e in repaired] == [e.get("train") for e in whole]


def test_first_log_entry_after_a_resume_averages_the_steps_since_the_last_entry(tmp_path):
    # log every 4, checkpoint every 3: the checkpoint of step 3 holds the sums of steps 1-3
    options = dict(steps=8, log_every=4, checkpoint_every=3)
    train(_config(tmp_path / "whole", **options))
    with pytest.raises(Killed):
        train(_config(tmp_path / "parts", **options), on_step=_kill_at(5))
    train(_config(tmp_path / "parts", resume=True, **options))
    whole, parts = _log(tmp_path / "whole"), _log(tmp_path / "parts")
    assert [e["step"] for e in parts] == [e["step"] for e in whole] == [4, 8, 8]
    assert [e.get("train") for e in parts] == [e.get("train") for e in whole]  # steps 1-4, not only step 4


def test_a_different_run_into_a_folder_whose_run_died_before_its_first_checkpoint_is_refused(tmp_path):
    with pytest.raises(Killed):  # no checkpoint yet, but a config and a log entry
        train(_config(tmp_path, checkpoint_every=100), on_step=_kill_at(2))
    assert not (tmp_path / CHECKPOINT).exists() and len(_log(tmp_path)) == 2
    with pytest.raises(UsageError, match="already holds a run.*--overwrite"):
        train(_config(tmp_path, beta=0.7, steps=3))
    assert len(_log(tmp_path)) == 2 and json.loads((tmp_path / CONFIG).read_text())["beta"] == 0.5
    with pytest.raises(UsageError, match="beta=0.5 .now 0.7."):  # --resume: same settings only
        train(_config(tmp_path, beta=0.7, steps=3, resume=True))
    with pytest.warns(RunWarning, match="never written.*step 0"):  # the same run: it starts again
        train(_config(tmp_path, steps=3))  # (what `fastjac reproduce` does with an interrupted model)
    assert [e["step"] for e in _log(tmp_path)] == [1, 2, 3, 3]  # the last: held-out evaluation
    train(_config(tmp_path, beta=0.7, steps=2, overwrite=True))
    assert [e["step"] for e in _log(tmp_path)] == [1, 2, 2]
    assert json.loads((tmp_path / CONFIG).read_text())["beta"] == 0.7
    assert load_checkpoint(tmp_path / CHECKPOINT)["config"]["beta"] == 0.7
    with pytest.raises(UsageError, match="pass one of them"):
        train(_config(tmp_path, resume=True, overwrite=True))


def _train_command(out, *extra):
    return ["train", *TINY, "--out", str(out), *extra]


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def test_full_disk_while_writing_the_log_or_the_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_train_command(out, "--steps", "2", "--checkpoint-every", "2")) == 0
    good = (out / CHECKPOINT).read_bytes()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullDisk:  # a file that cannot take another byte
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = full

    with monkeypatch.context() as m:  # the log writer
        m.setattr(runfolder, "open", FullDisk, raising=False)
        assert main(_train_command(out, "--steps", "4", "--resume")) == 2
    _one_line_error(capsys, str(out / LOG), "disk is full", "--resume")
    with monkeypatch.context() as m:  # the checkpoint writer (fsync of the temporary file)
        m.setattr(os, "fsync", full)
        assert main(_train_command(out, "--steps", "4", "--resume")) == 2
    _one_line_error(capsys, str(out / CHECKPOINT), "disk is full")
    assert (out / CHECKPOINT).read_bytes() == good  # the last good checkpoint is intact
    assert not list(out.glob(".*tmp*"))
    assert main(_train_command(out, "--steps", "4", "--resume")) == 0  # space freed: it continues
    assert load_checkpoint(out / CHECKPOINT)["step"] == 4


def test_read_only_folder_and_out_naming_a_file_are_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_train_command(afile, "--steps", "2")) == 2
    _one_line_error(capsys, f"--out {afile} is a file, not a folder")
    assert main(_train_command(afile / "run", "--steps", "2")) == 2
    _one_line_error(capsys, str(afile / "run"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:  # root ignores chmod, so the file system says it
        m.setattr(Path, "mkdir", read_only)
        assert main(_train_command(tmp_path / "new", "--steps", "2")) == 2
    _one_line_error(capsys, str(tmp_path / "new"), "read-only")
    if os.geteuid() != 0:  # a real read-only folder where permissions apply
        (tmp_path / "ro").mkdir(mode=0o555)
        assert main(_train_command(tmp_path / "ro", "--steps", "2")) == 2
        _one_line_error(capsys, str(tmp_path / "ro"), "permission denied")


def test_stale_temporary_files_of_killed_runs_are_deleted(tmp_path):
    train(_config(tmp_path, steps=2))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".{CHECKPOINT}.tmp-{int(done.stdout)}"  # that process has exited
    alive = tmp_path / f".{LOG}.tmp-{os.getppid()}"  # a running process's: left alone
    dead.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"")
    with pytest.warns(RunWarning, match=re.escape(str(dead))):
        train(_config(tmp_path, steps=3, resume=True))
    assert not dead.exists() and alive.exists()


def test_resume_of_a_finished_run_says_so_and_steps_below_the_checkpoint_are_refused(tmp_path, capsys):
    assert main(_train_command(tmp_path, "--steps", "3")) == 0
    config = (tmp_path / CONFIG).read_text()
    capsys.readouterr()
    assert main(_train_command(tmp_path, "--steps", "3", "--resume")) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(_train_command(tmp_path, "--steps", "2", "--resume")) == 2
    _one_line_error(capsys, "at step 3, beyond --steps 2")
    assert (tmp_path / CONFIG).read_text() == config  # not rewritten
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 3


def test_checkpoints_are_loaded_weights_only(tmp_path):
    import fractions
    path = tmp_path / CHECKPOINT
    save_checkpoint({"step": 1, "code": fractions.Fraction(1, 3)}, path)  # pickles an arbitrary object
    with pytest.raises(CheckpointError, match="could not be unpickled safely"):
        load_checkpoint(path)


def _wait_for_log(out, entries, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (out / LOG).exists() and len((out / LOG).read_text().splitlines()) >= entries:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {entries} log entries in {timeout} s")


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastjac", *_train_command(out, "--steps", "100000",
                                                                 "--checkpoint-every", "100000")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_log(out, 3, process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr and "SIGINT" in stderr, stderr
    step = load_checkpoint(out / CHECKPOINT)["step"]
    assert step >= 3 and [e["step"] for e in _log(out)] == list(range(1, step + 1))
    train(_config(out, steps=step + 2, log_every=1, checkpoint_every=100000, resume=True))
    assert [e["step"] for e in _log(out) if "train" in e] == list(range(1, step + 3))


# --- data -----------------------------------------------------------------------------------------

def test_bit_flipped_mnist_gz_names_the_file(tmp_path):
    images = np.zeros((40, 28, 28), dtype=np.uint8)  # mostly background, like MNIST: Huffman-coded
    images[:, 8:20, 10:18] = np.random.default_rng(0).integers(0, 256, (40, 12, 8))
    raw = gzip.compress(struct.pack(">IIII", 0x803, 40, 28, 28) + images.tobytes())
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    for position, raw_error in ((12, zlib.error), (len(raw) // 2, gzip.BadGzipFile), (len(raw) - 3, OSError)):
        damaged = bytearray(raw)  # a flip in the deflate stream's start, its middle, the length trailer
        damaged[position] ^= 0x10
        with pytest.raises(raw_error):  # what reading it directly raises, without the path
            gzip.decompress(bytes(damaged))
        path.write_bytes(bytes(damaged))
        with pytest.raises(DataError, match=re.escape(str(path)) + ": damaged or truncated compressed data"):
            load_dataset("mnist", data_dir=tmp_path)


def _png_header(width, height):
    """A PNG whose header claims width × height pixels (the pixel data is never decoded)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _faces(folder, n=12):
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((20, 40, 3), 128, dtype=np.uint8)).save(folder / f"{i:06d}.png")


def test_celeba_image_of_400_megapixels_is_refused_naming_the_file(tmp_path):
    _faces(tmp_path / "faces")
    bomb = tmp_path / "faces" / "000005.png"
    bomb.write_bytes(_png_header(20000, 20000))
    with pytest.raises(DataError, match=re.escape(str(bomb)) + ".*(too large|megapixels)"):
        load_dataset("celeba", data_dir=tmp_path / "faces")
    with pytest.raises(DataError, match=re.escape(str(bomb))):  # and where a batch reads it
        data_module.ImageFiles([bomb]).batch(torch.tensor([0]))
    bomb.write_bytes(_png_header(9000, 9000))  # below PIL's own limit, above ours
    with pytest.raises(DataError, match="81 megapixels"):
        load_dataset("celeba", data_dir=tmp_path / "faces")


def test_bad_celeba_files_are_found_when_the_data_set_is_built(tmp_path):
    _faces(tmp_path / "faces")
    (tmp_path / "faces" / "000003.png").write_bytes(b"not a png")
    good = (tmp_path / "faces" / "000007.png").read_bytes()
    (tmp_path / "faces" / "000007.png").write_bytes(good[:20] + bytes([good[20] ^ 1]) + good[21:])  # bad CRC
    with pytest.raises(DataError, match="2 of 12 image files.*000003.png.*000007.png"):
        load_dataset("celeba", data_dir=tmp_path / "faces")


# --- DDP: a dead or stalled peer, a killed agent ----------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(rank, port, cfg, how, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)

    def fail(step, _):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGSTOP) if how == "stalls" else os._exit(3)

    started = time.monotonic()
    try:
        train(cfg, on_step=fail)
        results.put((rank, "finished", time.monotonic() - started))
    except PeerError as e:
        results.put((rank, str(e), time.monotonic() - started))
    except BaseException as e:  # anything else is a failure: report it rather than hang the test
        results.put((rank, f"not a PeerError: {e!r}", time.monotonic() - started))


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_peer_that_dies_or_stalls_stops_the_others_within_the_timeout(tmp_path, how):
    cfg = _config(tmp_path, steps=50, checkpoint_every=100, ddp_timeout=5.0)  # small, but not flaky
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_peer, args=(r, port, cfg, how, results)) for r in range(2)]
    for w in workers:
        w.start()
    try:
        rank, message, seconds = results.get(timeout=120)
        workers[0].join(timeout=30)
        assert rank == 0 and "lost the others" in message and "--ddp-timeout 5 s" in message, message
        assert seconds < 60 and workers[0].exitcode == 0, (seconds, workers[0].exitcode)
    finally:
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
            w.join()


AGENT = """
import subprocess, sys, time
worker = subprocess.Popen(sys.argv[1:])
print(worker.pid, flush=True)
time.sleep(3600)
"""


def _exited(pid):
    """Gone, or a zombie nobody reaped (in a container, pid 1 may not reap orphans)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killing_the_torchrun_agent_stops_its_workers_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastjac", *_train_command(out, "--steps", "100000", "--checkpoint-every",
                                                                 "100000")]
    env = dict(_env(), TORCHELASTIC_RUN_ID="test")  # what torchrun sets for its workers
    agent = subprocess.Popen([sys.executable, "-c", AGENT, *command], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(agent.stdout.readline())
    try:
        _wait_for_log(out, 2, agent)
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 60
        while not _exited(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _exited(worker), "the worker kept training after its agent died"
    finally:
        if not _exited(worker):
            os.kill(worker, signal.SIGKILL)
    assert load_checkpoint(out / CHECKPOINT)["step"] >= 2  # it stopped by SIGTERM, with a checkpoint


# --- load: threads ------------------------------------------------------------------------------

def test_default_threads_count_idle_cores_and_one_per_process_under_torchrun(monkeypatch):
    for name in ("OMP_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 2.0))  # a loaded 2-core machine
    assert threads.default_threads() == 1
    monkeypatch.setattr(threads, "_cores", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.default_threads() == threads.MAX_DEFAULT_THREADS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user asked
    assert threads.default_threads() == 3


def test_every_command_takes_threads_and_the_default_applies_before_dispatch(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (100.0, 100.0, 100.0))
    torch.set_num_threads(2)
    assert main(["info"]) == 0 and torch.get_num_threads() == 1  # loaded: one thread by default
    assert main(["--threads", "2", "info"]) == 0 and torch.get_num_threads() == 2
    parser, modules = _parser()
    commands = {"train": ["train", "--out", "x"], "demo": ["demo"], "bench": ["bench"],
                "reproduce": ["reproduce", "objectives", "--out", "x"]}
    for name, argv in commands.items():
        if name in modules:  # the command's own --threads, and the global one before it
            assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, name
            assert parser.parse_args(["--threads", "3", *argv]).global_threads == 3, name
    with pytest.raises(SystemExit) as e:
        main(["--threads", "0", "info"])
    assert e.value.code == 2


def test_every_example_takes_threads(monkeypatch, capsys):
    import runpy
    for script in sorted((ROOT / "examples").glob("*.py")):
        monkeypatch.setattr(sys, "argv", [str(script), "--help"])
        with pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="__main__")
        assert "--threads" in capsys.readouterr().out, script.name


# --- messages: user mistakes are one line, bugs keep their traceback ----------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist is not a folder"),
    (["--dataset", "celeba"], "--data-dir"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--batch-size", "5000"], "exceeds the 1500 training examples"),
    (["--architecture", "mnist"], "needs data of shape"),
    (["--device", "cuda:x"], "device must be"),
    (["--ddp-timeout", "-1"], "ddp_timeout must be finite and > 0"),
    (["--resume"], "holds no run to continue"),
])
def test_user_mistakes_are_one_line_with_exit_status_2(tmp_path, capsys, flags, fragment):
    assert main(_train_command(tmp_path / "run", "--steps", "2", *flags)) == 2
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "run" / CONFIG).exists()  # nothing written that would block the next try


def test_demo_mistakes_are_one_line(capsys):
    assert main(["demo", "--beta", "-1", "--steps", "1"]) == 2
    _one_line_error(capsys, "--beta must be finite and > 0")
    with pytest.raises(SystemExit) as e:  # argparse: usage and one error line, status 2
        main(["demo", "--steps", "0"])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_a_bug_inside_the_training_loop_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(run, net):
        raise ValueError("a bug, not a user mistake")
    monkeypatch.setattr(trainer, "_step", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(_train_command(tmp_path, "--steps", "2"))


# --- issue 13: short functions, no private document cited -----------------------------------------------

OWN = [*sorted((ROOT / "fastjac" / "training").glob("*.py")), ROOT / "fastjac" / "cli.py",
       ROOT / "fastjac" / "demo.py", *sorted((ROOT / "examples").glob("*.py"))]


def test_no_function_over_40_lines_and_no_private_spec_cited():
    for path in OWN:
        text = path.read_text()
        assert "SPEC" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 40, f"{path.name}:{node.name}"
