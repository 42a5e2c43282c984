"""The command line's edges (issue 17): options refused before any training with one line
``gpunet CMD: error: ...`` and exit status 2, ``--version``, ``info``, a closed pipe, Ctrl-C and
resume, and ``gpunet train --help`` generated from the registries. Most run the command in a
fresh process, as a user would, and check its exit status, its message and that no traceback
was printed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gpunet import cli, data, models, optim
from gpunet.serialize import read_meta

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def gpunet(args: list[str], cwd, env: dict | None = None, timeout: float = 120,
           **kwargs) -> subprocess.CompletedProcess:
    """``gpunet ARGS`` in a fresh process (``python -m gpunet``)."""
    return subprocess.run([sys.executable, "-m", "gpunet", *args], cwd=cwd,
                          env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_usage_error(done: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit status 2 and exactly one line on stderr, ``gpunet COMMAND: error: ...`` holding
    every fragment; no traceback, nothing trained."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"gpunet {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in done.stderr and "epoch 1" not in done.stderr


TRAIN = ["train", "mlp", "--data", "blobs", "--device", "cpu", "--no-progress"]


# -- counts, datasets, resume and momentum refused before training ---------------------------

@pytest.mark.parametrize("args, option, got", [
    (["--epochs", "0"], "--epochs", "got 0"),
    (["--epochs", "-1"], "--epochs", "got -1"),
    (["--batch-size", "0"], "--batch-size", "got 0"),
    (["--epochs", "two"], "--epochs", "got 'two'"),
])
def test_non_positive_counts_are_refused(tmp_path, args, option, got):
    assert_usage_error(gpunet(TRAIN + args, tmp_path), "train", option,
                       "expected a positive integer", got)


def test_seq_len_zero_is_refused_in_process(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's exit, as for every option type
        cli.main(["train", "lstm", "--data", "adding", "--seq-len", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpunet train: error: argument --seq-len: ")


@pytest.mark.parametrize("option", ["--k", "--noise-dim"])
def test_gan_counts_are_refused(capsys, option):  # checked by gpunet.gan, one line too
    assert cli.main(["train", "gan", "--data", "digits", option, "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{option} must be at least 1" in err[0]


def test_mnist_without_data_dir_says_data_dir_is_needed(tmp_path):
    assert_usage_error(gpunet(["train", "mlp", "--data", "mnist"], tmp_path), "train",
                       "--data mnist needs --data-dir")


def test_data_dir_for_a_dataset_without_files_is_refused(capsys):
    assert cli.main(TRAIN + ["--data-dir", "."]) == 2
    assert "--data-dir: dataset 'blobs' reads no folder" in capsys.readouterr().err


def test_unknown_model_lists_gan_too(capsys):
    assert cli.main(["train", "nosuch", "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'" in err and "'gan'" in err and "'mlp'" in err


def test_resume_without_checkpoint_says_so(tmp_path):
    assert_usage_error(gpunet(TRAIN + ["--resume"], tmp_path), "train",
                       "--resume needs --checkpoint")
    assert_usage_error(gpunet(TRAIN + ["--resume", "--checkpoint", "gone.ckpt"], tmp_path),
                       "train", "--resume: no checkpoint at gone.ckpt")


@pytest.mark.parametrize("argv", [
    TRAIN + ["--momentum", "0.5"],                        # mlp's default optimizer: adam
    TRAIN + ["--optimizer", "adam", "--momentum", "0.9"],
    ["train", "gan", "--data", "digits", "--momentum", "0.5"],
])
def test_momentum_without_a_momentum_optimizer_is_refused(tmp_path, argv):
    assert_usage_error(gpunet(argv, tmp_path), "train", "--momentum",
                       "adam takes no momentum")


def _recording(base: type, seen: dict) -> type:
    class Recording(base):
        def __init__(self, params, lr, momentum=0.0):
            seen["momentum"] = momentum
            super().__init__(params, lr=lr, momentum=momentum)
    return Recording


@pytest.mark.parametrize("name, extra, expected", [
    ("sgd", [], 0.9),                     # SGD's momentum defaults to 0.9, as before
    ("sgd", ["--momentum", "0.5"], 0.5),
    ("sgd", ["--momentum", "0"], 0.0),
    ("rmsprop", [], 0.0),                 # RMSprop takes momentum, as torch.optim.RMSprop
    ("rmsprop", ["--momentum", "0.3"], 0.3),
])
def test_momentum_reaches_the_optimizers_that_take_it(monkeypatch, capsys, name, extra,
                                                     expected):
    seen: dict = {}
    monkeypatch.setitem(optim.OPTIMIZERS, name, _recording(optim.OPTIMIZERS[name], seen))
    assert cli.main(TRAIN + ["--epochs", "1", "--optimizer", name, *extra]) == 0
    assert seen["momentum"] == expected


# -- output paths checked before the first epoch ------------------------------------------------

@pytest.mark.parametrize("option", ["--save", "--checkpoint", "--metrics-out"])
def test_output_path_in_a_missing_folder_is_refused_before_training(tmp_path, option):
    path = os.path.join("no-such-folder", "out.file")
    assert_usage_error(gpunet(TRAIN + [option, path], tmp_path), "train",
                       f"{option} {path}: the folder no-such-folder does not exist")


@pytest.mark.parametrize("option", ["--save", "--checkpoint", "--metrics-out"])
def test_output_path_that_is_a_folder_or_under_a_file_is_refused(tmp_path, option):
    (tmp_path / "afile").write_text("x")
    assert_usage_error(gpunet(TRAIN + [option, "afile/out"], tmp_path), "train",
                       f"{option} afile/out: the folder afile does not exist")
    (tmp_path / "adir").mkdir()
    assert_usage_error(gpunet(TRAIN + [option, "adir"], tmp_path), "train",
                       f"{option} adir: is a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders; the check would pass")
def test_output_path_in_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        done = gpunet(TRAIN + ["--save", "ro/model.npz"], tmp_path)
    finally:
        folder.chmod(0o700)
    assert_usage_error(done, "train", "--save ro/model.npz: cannot write in the folder ro")
    assert ".tmp" not in done.stderr and list(folder.iterdir()) == []


def test_the_write_check_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(TRAIN + ["--epochs", "1", "--save", "m.npz", "--metrics-out", "m.json",
                             "--checkpoint", "c.ckpt"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt", "m.json", "m.npz"]


# -- parity ------------------------------------------------------------------------------------

def test_parity_refuses_dtypes_other_than_float32_and_float64(tmp_path):
    done = gpunet(["parity", "--dtypes", "float32,float16", "--cases", "Dense"], tmp_path)
    assert_usage_error(done, "parity", "--dtypes", "float32 and/or float64", "'float16'")
    assert done.stdout == ""  # no table of 96 failures


@pytest.mark.parametrize("devices, fragment", [
    ("cpu,nosuch", "--devices: unknown device 'nosuch'"),
    ("cpu,,cpu", "--devices: an empty entry in 'cpu,,cpu'"),
])
def test_parity_unknown_devices_are_one_line(capsys, devices, fragment):
    assert cli.main(["parity", "--devices", devices, "--cases", "Dense"]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpunet parity: error: ")
    assert fragment in lines[0] and out.out == ""


# -- version, help, info -----------------------------------------------------------------------

def test_version(tmp_path):
    import gpunet as package
    done = gpunet(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"gpunet {package.__version__}"


@pytest.mark.parametrize("command", ["train", "sample"])
def test_device_help_lists_emulated(tmp_path, command):
    done = gpunet([command, "--help"], tmp_path, env={"COLUMNS": "200"})
    assert done.returncode == 0
    device_help = " ".join(done.stdout.split("--device DEVICE")[-1].split()[:5])
    assert "cpu, cuda, cuda:N, emulated" in device_help


def test_train_help_lists_models_datasets_and_defaults(tmp_path):
    done = gpunet(["train", "--help"], tmp_path)
    assert done.returncode == 0
    text = done.stdout.replace("\n" + " " * 15, " ")  # undo the wrapping of each entry
    entries = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")
               and line.split()[0] in {*models.MODELS, "gan", *data.DATASETS}}
    for name, spec in models.MODELS.items():
        for option, value in spec.defaults.items():
            assert f"--{option.replace('_', '-')} {value}" in entries[name], (name, option)
    assert "--epochs 400" in entries["gan"]
    assert set(data.DATASETS) <= set(entries)
    assert "--data-dir DIR" in entries["mnist"] and "--seq-len, default 50" in entries["adding"]


def test_train_help_is_generated_from_the_registry(monkeypatch):
    spec = models.ModelSpec("tiny", models.mlp, models.SoftmaxCrossEntropy,
                            {"epochs": 7, "batch_size": 3, "lr": 0.5, "optimizer": "sgd"},
                            "a model registered in the test")
    monkeypatch.setitem(models.MODELS, "tiny", spec)
    epilog = cli._models_epilog()
    assert "tiny" in epilog and "a model registered in the test" in epilog
    assert "--epochs 7, --batch-size 3, --lr 0.5, --optimizer sgd" in " ".join(epilog.split())


def test_info_says_whether_the_emulator_compiler_is_present(tmp_path):
    done = gpunet(["info"], tmp_path, env={"CXX": "/nonexistent/c++"})
    assert done.returncode == 0, done.stderr
    assert "emulator: unavailable, no C++ compiler ('/nonexistent/c++' not found" in done.stdout
    if shutil.which("g++"):
        done = gpunet(["info"], tmp_path, env={"CXX": "g++"})
        assert f"emulator: C++ compiler g++ ({shutil.which('g++')})" in done.stdout


@pytest.mark.parametrize("argv", [["info"], ["train", "--help"], ["--version"]])
def test_a_closed_pipe_ends_quietly(tmp_path, argv):
    """`gpunet info | head -2`: the reader is gone; made certain by closing the pipe's read
    end before the command writes anything."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "gpunet", *argv], cwd=tmp_path, env=ENV,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode in (0, 1)


def test_head_2_of_info(tmp_path):
    done = subprocess.run(f"{sys.executable} -m gpunet info | head -2", shell=True,
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[0].startswith("gpunet ")
    assert len(done.stdout.splitlines()) == 2 and done.stderr == ""


# -- the emulator without a compiler -------------------------------------------------------

@pytest.mark.parametrize("argv, command, option", [
    (["train", "lenet", "--data", "digits", "--device", "emulated"], "train", "--device"),
    (["train", "gan", "--data", "digits", "--device", "emulated"], "train", "--device"),
    (["parity", "--devices", "cpu,emulated", "--cases", "Dense"], "parity", "--devices"),
])
def test_emulated_without_a_compiler_is_one_line(tmp_path, argv, command, option):
    done = gpunet(argv, tmp_path, env={"CXX": "/nonexistent"})
    assert_usage_error(done, command, f"{option} emulated: the CUDA emulator needs a C++ "
                       "compiler", "'/nonexistent'")


# -- Ctrl-C and resume ------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_with_how_to_resume_and_the_resumed_run_counts_all_time(
        tmp_path):
    argv = TRAIN + ["--epochs", "100000", "--checkpoint", "run.ckpt"]
    proc = subprocess.Popen([sys.executable, "-m", "gpunet", *argv], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run.ckpt").exists():  # the first epoch is done
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gpunet train: interrupted; the checkpoint run.ckpt holds epoch ")
    assert last.endswith("resume with gpunet " + " ".join(argv) + " --resume"), last
    assert [line for line in err.splitlines() if "interrupted" in line] == [last]

    meta = read_meta(tmp_path / "run.ckpt")
    k = meta["epoch"]
    assert f"holds epoch {k}:" in last and meta["seconds"] > 0
    resumed = gpunet(TRAIN + ["--epochs", str(k + 1), "--checkpoint", "run.ckpt", "--resume",
                              "--metrics-out", "m.json"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"gpunet: resumed from epoch {k} of {k + 1} (run.ckpt)" in resumed.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    # the whole run's training time: the interrupted part stored in the checkpoint, plus more
    assert metrics["seconds"] > meta["seconds"]
    assert read_meta(tmp_path / "run.ckpt")["seconds"] >= meta["seconds"]


def test_ctrl_c_without_a_checkpoint_of_this_run_offers_no_resume(tmp_path, monkeypatch):
    none = "gpunet train: interrupted; no checkpoint was written (--checkpoint PATH)"
    assert cli._interrupted(TRAIN, time.time()) == none
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.ckpt").write_text("an earlier run's")
    os.utime(tmp_path / "old.ckpt", (time.time() - 3600,) * 2)
    assert cli._interrupted(TRAIN + ["--checkpoint", "old.ckpt"], time.time()) == none
    assert cli._interrupted(["parity"], time.time()) == "gpunet parity: interrupted"
    assert cli._interrupted([], time.time()) == "gpunet: interrupted"


def test_a_resumed_gan_run_says_so(tmp_path, capsys):
    common = ["train", "gan", "--data", "digits", "--epochs", "1", "--batch-size", "256",
              "--device", "cpu", "--no-progress", "--checkpoint", str(tmp_path / "g.ckpt")]
    assert cli.main(common) == 0
    assert cli.main(common + ["--resume"]) == 0
    assert f"gpunet: resumed from epoch 1 of 1 ({tmp_path / 'g.ckpt'})" in capsys.readouterr().err


def test_a_resumed_gan_run_counts_the_time_of_the_whole_run(tmp_path):
    common = ["train", "gan", "--data", "digits", "--epochs", "1", "--batch-size", "256",
              "--device", "cpu", "--no-progress", "--checkpoint", str(tmp_path / "g.ckpt")]
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    assert cli.main(common + ["--metrics-out", str(first)]) == 0
    # resumed with nothing left to train: the metrics still count the first run's epoch
    assert cli.main(common + ["--resume", "--metrics-out", str(again)]) == 0
    seconds = json.loads(again.read_text())["seconds"]
    assert seconds > 0 and seconds == json.loads(first.read_text())["seconds"]
