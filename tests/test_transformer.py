"""The Transformer model, its token datasets, and `gpunet train transformer` / `gpunet sample`."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import gpunet
from gpunet import data, models
from gpunet.cli import main
from helpers import train_command

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


def test_reverse_dataset_is_seeded_token_sequences_and_their_reversal():
    train, test = data.reverse(seq_len=6, vocab=7, n_train=50, n_test=10, seed=3)
    assert train.x.shape == (50, 6) and test.x.shape == (10, 6)
    assert train.x.dtype == np.int64 and train.num_classes == 7
    np.testing.assert_array_equal(train.y, train.x[:, ::-1])
    assert train.x.min() >= 0 and train.x.max() < 7
    np.testing.assert_array_equal(data.reverse(6, 7, 50, 10, seed=3)[0].x, train.x)
    with pytest.raises(ValueError, match="reverse: expected seq_len >= 2"):
        data.reverse(seq_len=1)


def test_text_dataset_windows_and_next_characters(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcXabcabcabc", encoding="utf-8")
    train, test = data.text(path, seq_len=4, test_fraction=0.4)
    assert train.vocabulary == "Xabc" and train.num_classes == 4 and train.tokens
    decode = lambda row: "".join(train.vocabulary[i] for i in row)
    # the first 11 characters train, a window starting at every one that leaves a target
    assert [decode(r) for r in train.x] == ["abca", "bcab", "cabc", "abca", "bcab", "cabc",
                                            "abcX"]
    assert [decode(r) for r in train.y] == ["bcab", "cabc", "abca", "bcab", "cabc", "abcX",
                                            "bcXa"]
    assert [decode(r) for r in test.x] == ["bcab", "cabc", "abca", "bcab"]
    monkeypatch.setattr(data, "TEXT_MAX_TOKENS", 12)  # 7 windows of 4 would be 28 tokens
    sparse = data.text(path, seq_len=4, test_fraction=0.4)[0]
    assert [decode(r) for r in sparse.x] == ["abca", "abca", "abcX"]  # every third start
    with pytest.raises(FileNotFoundError, match="no file"):
        data.text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="too short"):
        data.text(path, seq_len=50)


def test_transformer_maps_tokens_to_per_token_logits():
    gpunet.seed(0)
    model = models.transformer((5,), 7, embed_dim=8, heads=2, blocks=1, hidden=16)
    y = model.forward(np.random.default_rng(0).integers(0, 7, (3, 5)), training=False)
    assert y.shape == (3, 5, 7)
    with pytest.raises(ValueError, match=r"transformer: expected token sequences of shape \(T,\)"):
        models.transformer((5, 2), 7)


def test_a_causal_transformer_does_not_look_ahead():
    gpunet.seed(0)
    model = models.transformer((6,), 5, embed_dim=8, heads=2, blocks=2, hidden=16, causal=True)
    x = np.random.default_rng(1).integers(0, 5, (2, 6))
    changed = x.copy()
    changed[:, 4:] = (changed[:, 4:] + 1) % 5  # change the last two tokens only
    a, b = model.forward(x, training=False), model.forward(changed, training=False)
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_train_transformer_reverses_sequences(tmp_path):
    metrics = train_command(["transformer", "--data", "reverse"], tmp_path)
    print(metrics)
    assert metrics["test_accuracy"] >= 0.98
    assert metrics["seconds"] < 120


def test_a_text_model_trains_saves_and_samples(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    model_file = tmp_path / "lm.npz"
    metrics = train_command(["transformer", "--data", "text", "--data-file", str(path),
                             "--seq-len", "16", "--epochs", "3", "--batch-size", "32",
                             "--save", str(model_file)], tmp_path)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert metrics["test_perplexity"] < 2.0  # of 14 characters: the text repeats
    done = subprocess.run([sys.executable, "-m", "gpunet", "sample", str(model_file),
                           "--prompt", "the cat sat on ", "--length", "12", "--temperature", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.rstrip("\n")
    assert out.startswith("the cat sat on ") and len(out) == len("the cat sat on ") + 12
    assert out == "the cat sat on the mat. the"  # the likeliest continuation of its corpus


def test_command_line_mistakes_are_one_line_and_status_2(tmp_path, capsys):
    assert main(["train", "transformer", "--data", "text"]) == 2
    assert "needs --data-file" in capsys.readouterr().err
    assert main(["train", "mlp", "--data", "digits", "--data-file", "x.txt"]) == 2
    assert "reads no file" in capsys.readouterr().err
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["train", "mlp", "--data", "text", "--data-file", str(path)]) == 2
    assert "cannot be made causal" in capsys.readouterr().err
    plain = tmp_path / "mlp.npz"
    gpunet.save(models.mlp((4,), 3), plain)
    assert main(["sample", str(plain), "--prompt", "a"]) == 2
    assert "not a text model" in capsys.readouterr().err
