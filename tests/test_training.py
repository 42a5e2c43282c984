"""The Trainer (checkpoints, resume, divergence) and the command line."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet import Sequential, Trainer, TrainingDiverged, data, optim
from gpunet.cli import main
from gpunet.layers import Dense, Dropout, ReLU
from gpunet.losses import SoftmaxCrossEntropy

ROOT = Path(__file__).resolve().parents[1]


def small_setup(seed: int = 0):
    gpunet.seed(seed)
    train, test = data.blobs(n=300, classes=3)
    model = Sequential([Dense(2, 32), ReLU(), Dropout(0.1), Dense(32, 3)])
    opt = optim.SGD(model.params(), lr=0.1, momentum=0.9)
    sched = optim.StepDecay(opt, step_size=2, gamma=0.5)
    return train, test, Trainer(model, SoftmaxCrossEntropy(), opt, schedule=sched, progress=False)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    train, test, full = small_setup()
    full.fit(train, epochs=4, batch_size=16, val=test, seed=3)

    train, test, first = small_setup()
    ckpt = tmp_path / "run.ckpt"
    first.fit(train, epochs=2, batch_size=16, val=test, checkpoint=ckpt, seed=3)
    gpunet.seed(999)  # a fresh process would not share the interrupted run's random state
    _, _, resumed = small_setup(seed=5)  # other initial weights: all must come from the file
    resumed.fit(train, epochs=4, batch_size=16, val=test, checkpoint=ckpt, resume=True, seed=3)

    for (name, a), b in zip(full.model.params().items(), resumed.model.params().values()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]
    assert strip(resumed.history) == strip(full.history)
    assert [row["lr"] for row in full.history] == [0.1, 0.1, 0.05, 0.05]


def test_training_learns(tmp_path):
    train, test, trainer = small_setup()
    history = trainer.fit(train, epochs=8, batch_size=16, val=test, seed=1)
    assert history[-1]["loss"] < history[0]["loss"] * 0.7
    assert trainer.evaluate(test)["accuracy"] > 0.9
    assert trainer.predict(test.x).shape == (len(test), 3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train, test, trainer = small_setup()
    ckpt = tmp_path / "run.ckpt"
    trainer.fit(train, epochs=1, batch_size=16, checkpoint=ckpt, seed=2)
    good = ckpt.read_bytes()
    train.x[5] = np.nan
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step \d+"):
        trainer.fit(train, epochs=3, batch_size=16, checkpoint=ckpt, resume=True, seed=2)
    assert ckpt.read_bytes() == good
    assert all(np.isfinite(p.data).all() for p in trainer.model.params().values())


def test_progress_bar_prints_one_line_per_epoch():
    train, _, trainer = small_setup()
    trainer.progress, trainer.log = True, io.StringIO()
    trainer.fit(train, epochs=2, batch_size=64, seed=0)
    lines = trainer.log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2 [") and " loss " in lines[0] and " acc " in lines[0]


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    train, _, trainer = small_setup()
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        trainer.fit(train, epochs=1, checkpoint=tmp_path / "missing", resume=True)


def _gpunet_command() -> list[str]:
    script = Path(sys.executable).parent / "gpunet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gpunet"]


def test_readme_command_trains_mlp_on_digits(tmp_path):
    """The README's first command: `gpunet train mlp --data digits` reaches >= 0.95 quickly."""
    out = tmp_path / "metrics.json"
    model_path = tmp_path / "mlp.npz"
    subprocess.run([*_gpunet_command(), "train", "mlp", "--data", "digits", "--device", "cpu",
                    "--metrics-out", str(out), "--save", str(model_path), "--no-progress"],
                   check=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"test_accuracy", "test_loss", "epochs", "seconds", "device"}
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["seconds"] < 60
    assert metrics["device"] == "cpu"
    model = gpunet.load(model_path)
    _, test = data.digits(flat=False)
    pred = model.forward(test.x, training=False).argmax(axis=1)
    assert abs((pred == test.y).mean() - metrics["test_accuracy"]) < 1e-9


def test_cli_resume_from_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    args = ["train", "mlp", "--data", "blobs", "--device", "cpu", "--no-progress",
            "--checkpoint", str(ckpt)]
    assert main(args + ["--epochs", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["epochs"] == 2 and resumed["epochs"] == 3


@pytest.mark.parametrize("args, match", [
    (["train", "nonet", "--data", "digits"], "unknown model 'nonet'"),
    (["train", "mlp", "--data", "nodata"], "unknown dataset 'nodata'"),
    (["train", "mlp", "--data", "mnist", "--data-dir", "/nonexistent"], "nonexistent"),
    (["train", "mlp", "--data", "digits", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_errors(args, match, capsys):
    assert main(args + ["--no-progress"]) == 2
    assert match in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gpunet 0.1.0" in out and "numpy" in out and "device: " in out and "mlp" in out
    from gpunet.kernels import kernel_files
    assert f"kernels: {len(kernel_files())} file(s)" in out
    from gpunet import KernelCompileError, nvrtc
    try:  # with the nvrtc extra the kernels are compiled; without it info says why not
        nvrtc.library()
        assert "kernels: compile under NVRTC 12." in out
    except KernelCompileError:
        assert "kernels: not compiled (NVRTC is not installed" in out


def test_help_lists_the_train_options():
    out = subprocess.run([*_gpunet_command(), "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--data", "--epochs", "--batch-size", "--lr", "--optimizer", "--device",
                 "--seed", "--save", "--metrics-out", "--checkpoint", "--resume"):
        assert flag in out
