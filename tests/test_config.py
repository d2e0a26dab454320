import pytest

from headswap.config import ParameterError, parse_finetune

BASE = {"data": {"path": "images"}, "base": {"source": "file", "path": "m.keras"}}


def test_defaults_and_square_image_size():
    cfg = parse_finetune({**BASE, "data": {"path": "x", "image_size": 64}})
    assert cfg.data.image_size == (64, 64)
    assert cfg.head.dense == [128] and cfg.phase2.learning_rate < cfg.phase1.learning_rate


@pytest.mark.parametrize(
    "override, message",
    [
        ({"phase1": {"epochs": -1}}, "finetune.phase1.epochs: got -1"),
        ({"phase2": {"optimizer": "adagrad"}}, "finetune.phase2.optimizer: got 'adagrad'"),
        ({"head": {"dropuot": 0.1}}, "finetune.head.dropuot: unknown key"),
        ({"data": {"path": "x", "batch_size": "many"}}, "finetune.data.batch_size: got 'many'"),
        ({"base": {"source": "keras_applications"}}, "finetune.base.name is required"),
    ],
)
def test_bad_parameters_name_key_and_value(override, message):
    with pytest.raises(ParameterError, match=message):
        parse_finetune({**BASE, **override})
