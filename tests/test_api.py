"""The PyTorch-style Python API: train/eval modes, freezing, weight sharing, state_dict,
summary, Trainer.predict on a Dataset, metric names, and the DataLoader's reshuffling."""
from __future__ import annotations

import io

import numpy as np
import pytest

import gpunet
from gpunet import Sequential, Trainer, data, optim
from gpunet.errors import ShapeError, StateError
from gpunet.layers import BatchNorm, Dense, Dropout, Parameter, ReLU
from gpunet.layers.base import IncompatibleKeys
from gpunet.losses import MSE, DiceLoss, SoftmaxCrossEntropy, dice

R = np.random.default_rng(0)


def mlp() -> Sequential:
    return Sequential([Dense(4, 8), ReLU(), Dropout(0.5), Dense(8, 3)])


def bn_model() -> Sequential:
    return Sequential([Dense(4, 6), BatchNorm(6), ReLU(), Dense(6, 2)])


def x_of(n: int = 16, f: int = 4) -> np.ndarray:
    return R.normal(size=(n, f)).astype(np.float32)


def weights(model) -> dict[str, np.ndarray]:
    return {k: p.data.copy() for k, p in model.params().items()}


# -- train() / eval() ------------------------------------------------------------------------
def test_layers_start_in_training_mode_and_eval_train_set_every_layer():
    model = mlp()
    assert all(layer.training for layer in model.walk())
    assert model.eval() is model
    assert not any(layer.training for layer in model.walk())
    assert model.train() is model and all(layer.training for layer in model.walk())
    model.train(False)
    assert not model[2].training


def test_dropout_follows_the_mode_and_an_explicit_training_wins():
    model, x = mlp(), x_of()
    model.eval()
    np.testing.assert_array_equal(model(x), model.forward(x))  # no draws: deterministic
    np.testing.assert_array_equal(model(x), model.forward(x, training=False))
    relu = model[1].forward(model[0].forward(x))
    np.testing.assert_array_equal(model[2](relu), relu)  # eval: nothing dropped
    dropped = model[2].forward(relu, training=True)  # an explicit mode wins
    assert ((dropped == 0) & (relu != 0)).any()
    model.train()
    assert ((model[2](relu) == 0) & (relu != 0)).any()


def test_batchnorm_follows_the_mode_of_the_layer_itself():
    model, x = bn_model(), x_of()
    bn = model[1]
    before = bn.state()["running_mean"].copy()
    model.eval()
    model(x)
    np.testing.assert_array_equal(bn.state()["running_mean"], before)  # eval: no update
    model.train()
    bn.eval()  # one layer in eval inside a training model, as PyTorch allows
    model(x)
    np.testing.assert_array_equal(bn.state()["running_mean"], before)
    model.forward(x, training=True)  # an explicit mode applies to the whole call
    assert not np.array_equal(bn.state()["running_mean"], before)
    bn.train()
    moved = bn.state()["running_mean"].copy()
    model(x)
    assert not np.array_equal(bn.state()["running_mean"], moved)


def test_trainer_fit_trains_and_evaluate_evaluates_whatever_the_mode():
    train, test = data.blobs(n=64, classes=2, features=4)
    model = bn_model().eval()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      progress=False)
    before = model[1].state()["running_mean"].copy()
    trainer.fit(train, epochs=1, batch_size=16, seed=0)
    assert not np.array_equal(model[1].state()["running_mean"], before)  # trained in train mode
    assert not model[1].training  # and the mode is left as it was
    model.train()
    scores = trainer.evaluate(test)
    model.eval()
    assert trainer.evaluate(test) == scores


def test_train_refuses_a_mode_that_is_not_a_bool():
    with pytest.raises(TypeError, match=r"Sequential.train: expected mode to be True or False, "
                                        r"got 'eval'"):
        mlp().train("eval")


# -- freezing ------------------------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda p: optim.Adam(p, lr=0.01, weight_decay=0.1),
    lambda p: optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.1),
], ids=["sgd", "adam", "rmsprop"])
def test_a_frozen_first_layer_stays_unchanged_while_the_rest_trains(make_opt):
    train, _ = data.blobs(n=96, classes=3, features=4)
    model = Sequential([Dense(4, 8), ReLU(), Dense(8, 3)])
    assert model[0].freeze() is model[0]
    assert [p.requires_grad for p in model.params().values()] == [False, False, True, True]
    opt = make_opt(model.params())
    before = weights(model)
    Trainer(model, SoftmaxCrossEntropy(), opt, progress=False).fit(train, 3, 16, seed=0)
    for name in ("0.weight", "0.bias"):
        np.testing.assert_array_equal(model.params()[name].data, before[name])
        assert not model.params()[name].grad.any()
        for slot in opt.slots[name].values():  # momentum / moments never advanced
            assert not slot.any()
    for name in ("2.weight", "2.bias"):
        assert not np.array_equal(model.params()[name].data, before[name])


def test_frozen_layers_return_input_gradients_and_keep_their_grad_untouched():
    layer, x = Dense(4, 3), x_of(5)
    dy = R.normal(size=(5, 3)).astype(np.float32)
    layer.forward(x)
    dx = layer.backward(dy)
    kept = layer.weight.grad.copy()  # a gradient accumulated before freezing stays as it was
    layer.freeze()
    layer.forward(x)
    np.testing.assert_allclose(layer.backward(dy), dx, rtol=1e-6)
    np.testing.assert_array_equal(layer.weight.grad, kept)
    layer.unfreeze()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * kept, rtol=1e-6)


def test_freeze_is_recursive_and_parameter_says_so():
    model = Sequential([Sequential([Dense(2, 2)]), Dense(2, 1)])
    model.freeze()
    assert not any(p.requires_grad for p in model.params().values())
    assert "requires_grad=False" in repr(model.params()["0.0.weight"])
    model[1].unfreeze()
    assert [p.requires_grad for p in model.params().values()] == [False, False, True, True]
    assert Parameter(np.zeros(2), requires_grad=False).requires_grad is False


def test_freezing_matches_pytorch():
    torch = pytest.importorskip("torch")
    x, y = x_of(8), R.normal(size=(8, 3)).astype(np.float32)
    model = Sequential([Dense(4, 5), ReLU(), Dense(5, 3)])
    ref = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for (k, p), t in zip(model.params().items(), ref.parameters()):
            t.copy_(torch.from_numpy(p.data))
    model[0].freeze()
    for t in ref[0].parameters():
        t.requires_grad_(False)
    opt = optim.SGD(model.params(), lr=0.1, momentum=0.9, weight_decay=0.01)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    loss = MSE()
    for _ in range(3):
        opt.zero_grad()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()
        topt.zero_grad()
        torch.nn.functional.mse_loss(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        topt.step()
    for (k, p), t in zip(model.params().items(), ref.parameters()):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


# -- weight sharing ------------------------------------------------------------------------
def tied() -> Sequential:
    model = Sequential([Dense(4, 4), ReLU(), Dense(4, 4)])
    return model.share("2.weight", model[0].weight)


def test_a_shared_parameter_is_listed_once_and_its_gradients_add_up():
    model = tied()
    assert model[2].weight is model[0].weight
    assert list(model.params()) == ["0.weight", "0.bias", "2.bias"]
    assert model.shared() == {"2.weight": "0.weight"}
    report = gpunet.gradcheck(model, x_of(3).astype(np.float64))  # both uses perturbed at once
    assert report.ok, str(report)


def test_an_optimizer_updates_a_shared_parameter_once():
    model, x = tied(), x_of(3)
    model.forward(x)
    model.backward(np.ones((3, 4), np.float32))
    w, g = model[0].weight.data.copy(), model[0].weight.grad.copy()
    optim.SGD(model.params(), lr=0.1).step()
    np.testing.assert_allclose(model[0].weight.data, w - 0.1 * g, rtol=1e-6)
    p = model.params()["0.weight"]
    with pytest.raises(ValueError, match=r"SGD: parameters 'a' and 'b' are the same Parameter"):
        optim.SGD({"a": p, "b": p}, lr=0.1)


def test_save_and_load_keep_the_tie(tmp_path):
    model = tied()
    gpunet.save(model, tmp_path / "tied.gpunet")
    loaded = gpunet.load(tmp_path / "tied.gpunet")
    assert loaded[2].weight is loaded[0].weight and loaded.shared() == model.shared()
    x = x_of(2)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


@pytest.mark.parametrize("name, param, error, match", [
    ("2.weight", np.zeros((4, 4)), TypeError, r"Sequential.share: expected a Parameter"),
    ("5.weight", None, KeyError, r"no parameter '5.weight'"),
    ("2.kernel", None, KeyError, r"no parameter '2.kernel'"),
    ("2.weight", Parameter(np.zeros((3, 4), np.float32)), ValueError,
     r"parameter '2.weight' is \(4, 4\) float32 on cpu, got \(3, 4\) float32 on cpu"),
])
def test_share_refuses_bad_arguments(name, param, error, match):
    model = Sequential([Dense(4, 4), ReLU(), Dense(4, 4)])
    param = model[0].weight if param is None else param
    with pytest.raises(error, match=match):
        model.share(name, param)
    assert model.shared() == {}


# -- state_dict ----------------------------------------------------------------------------
def test_state_dict_holds_host_copies_under_the_usual_names():
    model = bn_model()
    state = model.state_dict()
    assert list(state) == [*model.params(), *model.state()]
    assert "1.running_var" in state and all(isinstance(a, np.ndarray) for a in state.values())
    state["0.weight"][...] = 7  # a copy: the model is untouched
    assert not (model[0].weight.data == 7).any()


def test_load_state_dict_copies_values_onto_the_layers_dtype():
    src, dst = bn_model(), bn_model().to(dtype=np.float64)
    src.forward(x_of())  # running statistics move away from their start
    assert dst.load_state_dict(src.state_dict()) == IncompatibleKeys([], [])
    assert dst[0].weight.data.dtype == np.float64
    x = x_of()
    np.testing.assert_allclose(dst.forward(x.astype(np.float64), training=False),
                               src.forward(x, training=False), rtol=1e-5)


def test_load_state_dict_onto_a_gpu(standin):
    src = bn_model()
    dst = bn_model().to("cuda:1")
    dst.load_state_dict(src.state_dict())
    assert dst[0].weight.data.device.id == 1
    np.testing.assert_array_equal(gpunet.to_numpy(dst[0].weight.data), src[0].weight.data)
    back = dst.state_dict()
    assert all(type(a) is np.ndarray for a in back.values())


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("0.bias"), r"missing \['0.bias'\], unexpected \[\]"),
    (lambda s: s.update(extra=np.zeros(1)), r"missing \[\], unexpected \['extra'\]"),
])
def test_strict_load_state_dict_names_the_keys_and_changes_nothing(edit, match):
    model, state = bn_model(), bn_model().state_dict()
    edit(state)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"Sequential.load_state_dict: the names do not match "
                                         r"\(" + match):
        model.load_state_dict(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_wrong_shape_is_refused_even_when_not_strict_and_changes_nothing():
    model = bn_model()
    state = bn_model().state_dict()
    state["3.weight"] = np.zeros((3, 6))
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"expected '3.weight' of shape \(2, 6\), got \(3, 6\)"):
        model.load_state_dict(state, strict=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match=r"expected a dict of names to arrays, got list"):
        model.load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"expected '0.weight' to be a numeric array"):
        model.load_state_dict({**model.state_dict(), "0.weight": np.full((6, 4), "a")})


def test_non_strict_load_state_dict_loads_what_matches_and_says_what_not():
    model, other = bn_model(), bn_model()
    other[3].bias.data[...] = 1
    state = other.state_dict()
    del state["3.bias"]
    state["head.weight"] = np.zeros(2)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["3.bias"] and result.unexpected_keys == ["head.weight"]
    np.testing.assert_array_equal(model[3].weight.data, other[3].weight.data)
    assert not model[3].bias.data.any()  # missing: left as it was


def test_state_dict_loads_pytorch_weights():
    torch = pytest.importorskip("torch")
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    model = Sequential([Dense(4, 6), ReLU(), Dense(6, 2)])
    model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    x = x_of(5)
    np.testing.assert_allclose(model.forward(x), ref(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


# -- summary -------------------------------------------------------------------------------
def test_summary_of_lenet_lists_shapes_and_counts():
    model = gpunet.models.get("lenet").build((1, 28, 28), 10)
    text = model.summary(input_shape=(1, 28, 28))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "(batch", "1)", "params"]
    assert "Conv2D" in lines[3] and "(1, 6, 28, 28)" in lines[3] and lines[3].endswith("156")
    assert "(1, 400)" in text and "(1, 10)" in text
    assert lines[-1] == "total parameters: 61,706 (trainable 61,706, frozen 0)"
    model[0].freeze()
    assert model.summary().splitlines()[-1] == \
        "total parameters: 61,706 (trainable 61,550, frozen 156)"


def test_summary_changes_nothing_and_counts_a_shared_weight_once():
    model = bn_model()
    state = model.state_dict()
    rng_before = gpunet.rng.get_state()
    model.summary((4,))
    assert model.training and gpunet.rng.get_state() == rng_before
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(StateError, match="backward called before forward"):
        model.backward(np.zeros((1, 2), np.float32))
    assert tied().summary().splitlines()[-1] == \
        "total parameters: 24 (trainable 24, frozen 0)"  # 16 + 4 + 4: the tie counted once


def test_summary_with_a_wrong_input_shape_names_the_layer():
    with pytest.raises(ShapeError, match=r"Dense: expected input of shape \(\*, 4\), "
                                         r"got \(1, 5\)"):
        bn_model().summary((5,))


# -- Trainer: predict on a Dataset, metric names -------------------------------------------
def test_predict_takes_a_dataset_as_evaluate_does():
    train, test = data.blobs(n=40, classes=2)
    model = Sequential([Dense(2, 2)])
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      progress=False)
    np.testing.assert_array_equal(trainer.predict(test), trainer.predict(test.x))


def test_the_metric_is_named_after_what_it_is():
    train, test = data.shapes(n=20, size=8)
    model = Sequential([gpunet.layers.Conv2D(1, 1, 3, padding=1), gpunet.layers.Sigmoid()])
    log = io.StringIO()
    trainer = Trainer(model, DiceLoss(), optim.Adam(model.params(), lr=0.01), metric=dice,
                      log=log)
    history = trainer.fit(train, epochs=1, batch_size=8, val=test, seed=0)
    assert {"dice", "val_dice"} <= set(history[0]) and "accuracy" not in history[0]
    assert set(trainer.evaluate(test)) == {"loss", "dice"}
    shown = log.getvalue()
    assert " dice " in shown and " val_dice " in shown and "acc" not in shown


def test_accuracy_keeps_its_name_and_a_lambda_is_called_metric():
    train, test = data.blobs(n=40, classes=2)
    model = Sequential([Dense(2, 2)])
    log = io.StringIO()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1), log=log)
    assert {"accuracy", "val_accuracy"} <= set(trainer.fit(train, 1, 8, val=test, seed=0)[0])
    assert " acc " in log.getvalue() and " val_acc " in log.getvalue()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      metric=lambda p, t: None, progress=False)
    assert set(trainer.evaluate(test)) == {"loss", "metric"}


# -- DataLoader ----------------------------------------------------------------------------
def test_loader_reshuffles_on_every_pass_and_set_epoch_replays_a_pass():
    ds = data.Dataset(np.arange(40, dtype=np.float32)[:, None], np.arange(40))
    loader = data.DataLoader(ds, batch_size=8, seed=3)
    passes = [np.concatenate([y for _, y in loader]) for _ in range(3)]
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
    again = data.DataLoader(ds, batch_size=8, seed=3)  # same seed: the same sequence of passes
    for k in (2, 0, 1):
        again.set_epoch(k)
        np.testing.assert_array_equal(np.concatenate([y for _, y in again]), passes[k])


def test_trainer_runs_stay_reproducible_with_reshuffling():
    def run() -> dict:
        gpunet.seed(0)
        train, _ = data.blobs(n=64, classes=2)
        model = Sequential([Dense(2, 2)])
        Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                progress=False).fit(train, epochs=3, batch_size=8, seed=5)
        return weights(model)
    a, b = run(), run()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_freezing_and_summary_on_a_gpu(standin):
    train, _ = data.blobs(n=48, classes=3, features=4)
    model = Sequential([Dense(4, 8), ReLU(), Dense(8, 3)]).to("cuda:1")
    model[0].freeze()
    before = {k: gpunet.to_numpy(p.data) for k, p in model.params().items()}
    Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.params(), lr=0.01),
            progress=False).fit(train, 2, 16, seed=0)
    after = {k: gpunet.to_numpy(p.data) for k, p in model.params().items()}
    np.testing.assert_array_equal(after["0.weight"], before["0.weight"])
    assert not np.array_equal(after["2.weight"], before["2.weight"])
    assert model[0].weight.grad.device.id == 1
    text = model.summary((4,))
    assert "(1, 8)" in text and text.endswith("(trainable 27, frozen 40)")


def test_summary_of_a_graph_with_two_inputs():
    g = gpunet.Graph(["a", "b"])
    g.add("sum", gpunet.layers.Sum(), ["a", "b"])
    g.add("fc", Dense(3, 2), "sum")
    text = g.summary([(3,), (3,)])
    assert "sum" in text and "(1, 3)" in text and "(1, 2)" in text
