"""Which layers train, per-layer rates, stages, optimizers, schedules and callbacks."""

import signal
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from headswap.core import LayerSelection, bases, fit, heads, manifests, train
from headswap.project.config import parse_finetune
from tests.conftest import small_cnn

BASE_LAYERS = ["rescale", "conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "features"]


def _model(augment=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return heads.attach_head(bases.cut_model(small_cnn()), 3, dense=[16], dropout=0.2,
                             augmentation=augment)


def _cfg(folder: Path, **sections):
    sections.setdefault("training", {}).setdefault("resume_dir", str(folder.parent / "resume"))
    params = {"data": {"path": str(folder), "image_size": 32, "batch_size": 8},
              "base": {"path": "unused.keras"}, **sections}
    return parse_finetune(params)


def _fit(model, manifest, cfg, phase, first=0, **options):
    """``fit`` through the phase's stages of the parsed parameters (no backups unless given)."""
    options = replace(cfg.fit_options(), **{"backup_dir": None, "verbose": 0, **options})
    return fit(model, manifest, getattr(cfg, phase).stages_list(), options, first, phase)


def _weights(layer):
    return [w.copy() for w in layer.get_weights()]


def _changed(before, layer):
    return any(not np.array_equal(a, b) for a, b in zip(before, layer.get_weights(), strict=True))


@pytest.mark.parametrize(
    "selection, expected",
    [
        ({"all": True}, BASE_LAYERS),
        ({"names": ["conv2", "bn1"]}, ["bn1", "conv2"]),
        ({"regex": "conv.|bn2"}, ["conv1", "conv2", "bn2"]),
        ({"index": "1:-1"}, BASE_LAYERS[1:-1]),
        ({"index": "5:"}, BASE_LAYERS[5:]),
        ({"top": 3}, BASE_LAYERS[-3:]),
        ({"from_layer": "pool1"}, BASE_LAYERS[4:]),
    ],
)
def test_layer_selections(selection, expected):
    layers = train.base_layers(_model())
    assert [layer.name for layer in layers] == BASE_LAYERS
    chosen = train.select_layers(layers, LayerSelection(**selection))
    assert [layer.name for layer in chosen] == expected


def test_bad_selections_name_the_problem():
    layers = train.base_layers(_model())
    with pytest.raises(ValueError, match="No base layer named \\['convX'\\]"):
        train.select_layers(layers, LayerSelection(names=["convX"]))
    with pytest.raises(ValueError, match="matches no base layer"):
        train.select_layers(layers, LayerSelection(regex="nothing.*"))
    with pytest.raises(Exception, match="exactly one of"):
        LayerSelection(top=2, regex="x")


def test_only_selected_layers_train_and_counts_follow():
    model = _model()
    trainable = train.set_trainable(model, LayerSelection(top=3))
    assert trainable == ["conv2"]  # bn2 stays frozen; relu/features have no weights
    train.compile_model(model, keras.optimizers.Adam(1e-3))
    counts = train.parameter_counts(model)
    head = sum(int(np.prod(w.shape)) for name in ("head_dense1", "predictions")
               for w in model.get_layer(name).weights)
    conv2 = sum(int(np.prod(w.shape)) for w in model.get_layer("base").get_layer("conv2").weights)
    assert counts["trainable_params"] == head + conv2


@pytest.mark.slow  # trains a model for seconds
def test_phase2_by_default_trains_the_base_with_frozen_batchnorm_statistics(image_folder):
    cfg = _cfg(image_folder, phase1={"epochs": 1}, phase2={"epochs": 2})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    model = _model()
    base = model.get_layer("base")
    bn, conv = base.get_layer("bn1"), base.get_layer("conv1")
    bn_before = _weights(bn)
    h1 = _fit(model, manifest, cfg, "phase1")
    conv_before = _weights(conv)
    assert not _changed(bn_before, bn)
    h2 = _fit(model, manifest, cfg, "phase2", 1)
    assert h1["epoch"] == [0] and h2["epoch"] == [1, 2]
    assert not _changed(bn_before, bn), "moving mean/variance moved in phase 2"
    assert _changed(conv_before, conv)
    assert h2["parameter_counts"]["trainable_params"] > h1["parameter_counts"]["trainable_params"]


def test_a_group_at_rate_zero_does_not_move_while_others_do(image_folder):
    cfg = _cfg(image_folder, phase2={
        "epochs": 2, "learning_rate": 1e-2, "optimizer": "sgd", "schedule": "constant",
        "warmup_epochs": 0, "layer_rates": [{"layers": {"names": ["conv1"]}, "learning_rate": 0.0},
                        {"layers": {"names": ["conv2"]}, "learning_rate": 1e-3}]})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    model = _model()
    base = model.get_layer("base")
    conv1, conv2 = _weights(base.get_layer("conv1")), _weights(base.get_layer("conv2"))
    head = _weights(model.get_layer("predictions"))
    history = _fit(model, manifest, cfg, "phase2")
    assert not _changed(conv1, base.get_layer("conv1"))
    assert _changed(conv2, base.get_layer("conv2"))
    assert _changed(head, model.get_layer("predictions"))
    assert history["learning_rate.group0"] == [0.0, 0.0]
    assert history["learning_rate.group1"] == pytest.approx([1e-3, 1e-3])
    assert history["learning_rate"] == pytest.approx([1e-2, 1e-2])


def test_discriminative_rates_are_geometric_from_bottom_to_head():
    cfg = _cfg(Path("."), phase2={"learning_rate": 1e-2,
                                  "discriminative": {"min_learning_rate": 1e-4, "groups": 2}})
    model = _model()
    train.set_trainable(model, LayerSelection(all=True))
    groups = train.rate_groups(model, cfg.phase2.stages_list()[0])
    assert [[layer.name for layer in g.layers] for g in groups] == [["conv1"], ["conv2"]]
    assert [g.learning_rate for g in groups] == pytest.approx([1e-4, 1e-3])


@pytest.mark.slow  # trains a model for seconds
def test_gradual_unfreezing_stages_open_more_layers_on_one_epoch_axis(image_folder):
    cfg = _cfg(image_folder, phase2={"stages": [
        {"train": {"top": 3}, "epochs": 1, "learning_rate": 1e-3},
        {"train": "all", "epochs": 2, "learning_rate": 1e-4, "optimizer": "sgd"}]})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    model = _model()
    history = _fit(model, manifest, cfg, "phase2", 4)
    assert history["epoch"] == [4, 5, 6] and history["stage_starts"] == [4, 5]
    assert history["trainable_layers"] == [["conv2"], ["conv1", "conv2"]]
    assert history["learning_rate"] == pytest.approx([1e-3, 1e-4, 1e-4])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "sgd"])
def test_each_optimizer_with_weight_decay_and_cosine_warmup(image_folder, optimizer):
    cfg = _cfg(image_folder, phase1={"epochs": 4, "optimizer": optimizer, "learning_rate": 1e-2,
                                     "weight_decay": 1e-4, "schedule": "cosine",
                                     "warmup_epochs": 1})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    history = _fit(_model(), manifest, cfg, "phase1")
    rates = history["learning_rate"]
    assert rates[0] == pytest.approx(1e-2, rel=1e-3)  # warmed up to the peak by epoch 1's end
    assert rates[0] > rates[1] > rates[2] > rates[3] >= 0  # cosine decay afterwards
    assert np.isfinite(history["loss"]).all()


def test_label_smoothing_class_weights_and_augmentation(image_folder):
    cfg = _cfg(image_folder, phase1={"epochs": 1, "label_smoothing": 0.1},
               training={"class_weight": "balanced",
                         "augmentation": {"flip": "horizontal", "rotation": 0.1, "zoom": 0.1,
                                          "contrast": 0.2, "translation": 0.1}})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    layers = heads.augmentation_layers(**cfg.training.augmentation.model_dump(), seed=1)
    model = _model(layers)
    history = _fit(model, manifest, cfg, "phase1")
    assert model.loss.get_config()["label_smoothing"] == 0.1 and history["accuracy"]
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    x = keras.Input((32, 32, 1))
    y = x
    for layer in layers:
        y = layer(y)
    augment = keras.Model(x, y)
    np.testing.assert_allclose(augment(images, training=False), images)
    assert not np.allclose(augment(images, training=True), images)
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = train.class_weights(labels, ["a", "b", "c"], "balanced")
    assert weights == pytest.approx({0: 6 / 9, 1: 2.0, 2: 1.0})
    assert train.class_weights(labels, ["a", "b", "c"], {"b": 3}) == {0: 1.0, 1: 3.0, 2: 1.0}
    with pytest.raises(ValueError, match="unknown class"):
        train.class_weights(labels, ["a", "b", "c"], {"zebra": 2})


def test_early_stopping_restores_best_and_checkpoint_is_written(image_folder, tmp_path):
    cfg = _cfg(image_folder, phase1={"epochs": 6},
               training={"callbacks": {
                   "early_stopping": {"monitor": "loss", "patience": 0, "min_delta": 100.0},
                   "checkpoint": True, "checkpoint_dir": str(tmp_path / "ckpt")}})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    history = _fit(_model(), manifest, cfg, "phase1")
    assert history["epoch"] == [0, 1]  # no improvement of 100 after the first epoch
    assert list((tmp_path / "ckpt").rglob("phase1_best.keras"))


def test_reduce_lr_on_plateau_lowers_the_rate_and_conflicts_are_refused(image_folder):
    constant = {"schedule": "constant", "warmup_epochs": 0}  # the default phase 2 is cosine
    cfg = _cfg(image_folder, phase1={"epochs": 3, "learning_rate": 1e-2}, phase2=constant,
               training={"callbacks": {"reduce_lr_on_plateau": {
                   "monitor": "loss", "patience": 0, "factor": 0.5, "min_delta": 100.0}}})
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    history = _fit(_model(), manifest, cfg, "phase1")
    # the rate each epoch trained at: lowered after the second epoch showed no gain
    assert history["learning_rate"] == pytest.approx([1e-2, 1e-2, 5e-3])
    with pytest.raises(Exception, match="reduce_lr_on_plateau cannot"):
        _cfg(image_folder, phase1={"schedule": "cosine"}, phase2=constant,
             training={"callbacks": {"reduce_lr_on_plateau": {}}})
    with pytest.raises(Exception, match="reduce_lr_on_plateau cannot"):  # the default phase 2
        _cfg(image_folder, training={"callbacks": {"reduce_lr_on_plateau": {}}})


@pytest.mark.slow  # trains a model for seconds
def test_cached_features_train_the_same_head_as_the_image_pipeline(image_folder):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    images = np.stack([np.asarray(__import__("PIL.Image").Image.open(p), dtype="float32")
                       for p in manifest["path"][:6]])[..., None]
    results = {}
    for cache in (True, False):
        cfg = _cfg(image_folder, phase1={"epochs": 3, "learning_rate": 3e-3},
                   training={"cache_features": cache})
        model = _model()
        base_before = [w.copy() for w in model.get_layer("base").get_weights()]
        history = _fit(model, manifest, cfg, "phase1")
        assert all(np.array_equal(a, b) for a, b in
                   zip(base_before, model.get_layer("base").get_weights(), strict=True))
        results[cache] = (history, model.predict(images, verbose=0))
    (cached, p_cached), (plain, p_plain) = results[True], results[False]
    assert cached["epoch"] == plain["epoch"] == [0, 1, 2]
    np.testing.assert_allclose(cached["loss"], plain["loss"], rtol=1e-3)
    np.testing.assert_allclose(p_cached, p_plain, atol=1e-4)


class Interrupt(keras.callbacks.Callback):
    """Stops training as a Ctrl-C would, once epoch ``epoch`` has ended (and been backed up)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class LosesCtrlC(keras.callbacks.Callback):
    """Ctrl-C pressed as epoch ``epoch`` ends, its KeyboardInterrupt then lost, as NumPy loses
    it when the signal is handled inside its conversion of a tensor (of the logs Keras converts
    each epoch); counts the epochs that start."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.started, self.lost = epoch, [], False

    def on_epoch_begin(self, epoch, logs=None):
        self.started.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                self.lost = True


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT handled by Python's default handler, as in a terminal (a test process may have
    inherited it ignored, as in a shell's background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("cache", [True, False])
def test_a_ctrl_c_whose_interrupt_is_lost_still_stops_training(
        image_folder, cache, ctrl_c_as_in_a_terminal):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    cfg = _cfg(image_folder, phase1={"epochs": 30}, training={"cache_features": cache})
    ctrl_c = LosesCtrlC(2)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), manifest, cfg, "phase1", extra_callbacks=[ctrl_c])
    assert ctrl_c.lost
    assert ctrl_c.started[-1] <= 3  # stopped in the epoch after, not 27 epochs later
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_an_interrupted_phase_resumes_to_the_uninterrupted_result(image_folder, tmp_path, cache):
    manifest = manifests.ingest_image_folder(image_folder, seed=0)[0]
    cfg = _cfg(image_folder, phase1={"epochs": 4, "learning_rate": 3e-3},
               training={"cache_features": cache})
    uninterrupted = _model()
    expected = _fit(uninterrupted, manifest, cfg, "phase1")

    folder = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), manifest, cfg, "phase1", backup_dir=folder,
             extra_callbacks=[Interrupt(2)])
    assert list((folder / "phase1_stage1" / "backup").glob("epoch-00003"))
    assert not (folder / "phase1_stage1" / "done.weights.h5").exists()

    resumed = _model()
    history = _fit(resumed, manifest, cfg, "phase1", backup_dir=folder)
    assert history["epoch"] == [0, 1, 2, 3]
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-6)
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    again = _model()  # a finished stage is reused, not trained again
    assert _fit(again, manifest, cfg, "phase1", backup_dir=folder)["epoch"] == [0, 1, 2, 3]
    for a, b in zip(again.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
