from pathlib import Path

import pytest

from headswap.project.config import ParameterError, parse_finetune

BASE = {"data": {"path": "images", "image_size": 28}, "base": {"source": "file", "path": "m.keras"}}


def test_defaults_and_square_image_size():
    cfg = parse_finetune({**BASE, "data": {"path": "x", "image_size": 64}})
    assert cfg.data.image_size == (64, 64)
    assert cfg.head.dense == [64] and cfg.phase2.learning_rate < cfg.phase1.learning_rate


@pytest.mark.parametrize(
    "override, message",
    [
        ({"phase1": {"epochs": -1}}, "finetune.phase1.epochs: got -1"),
        ({"phase2": {"optimizer": "adamm"}},
         "finetune.phase2.optimizer: got .adamm.; unknown optimizer"),
        ({"head": {"dropuot": 0.1}}, "finetune.head.dropuot: unknown key"),
        ({"data": {"path": "x", "batch_size": "many"}}, "finetune.data.batch_size: got 'many'"),
        ({"base": {"source": "keras_applications"}}, "finetune.base.name is required"),
    ],
)
def test_bad_parameters_name_key_and_value(override, message):
    with pytest.raises(ParameterError, match=message):
        parse_finetune({**BASE, **override})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"base": {"source": "keras_applications", "name": "MobileNetV9"}},
         (r"finetune.base.name: got 'MobileNetV9'; not a known keras.applications "
          r"architecture\. Allowed: .*EfficientNetB7, .*InceptionV3, .*MobileNetV2, .*ResNet152")),
        ({"head": {"dropuot": 0.1}},
         (r"finetune.head.dropuot: unknown key \(given 0.1\); allowed keys here: pooling, "
          r"dense, dropout")),
        ({"epochs": 3},
         r"finetune.epochs: unknown key \(given 3\); allowed keys here: seed, .*phase1, phase2"),
        ({"data": {"path": "x", "image_size": 28, "val_fraction": 0.5, "test_fraction": 0.5}},
         r"finetune.data: val_fraction \+ test_fraction is 0.5 \+ 0.5; it must be below 1"),
        ({"export": {"formats": ["onnx", "coreml"]}},
         (r"^Invalid parameters:\n  finetune.export.formats.1: got 'coreml'; Input should be "
          r"'saved_model', 'tflite', 'tflite_quantized', 'tflite_int8' or 'onnx'$")),
    ],
)
def test_errors_say_what_is_allowed(override, message):
    with pytest.raises(ParameterError, match=message):
        parse_finetune({**BASE, **override})


def test_every_problem_is_in_one_message():
    with pytest.raises(ParameterError) as caught:
        parse_finetune({**BASE, "phase1": {"epochs": -1, "optimizer": "adamm"}, "sed": 1})
    lines = str(caught.value).splitlines()
    assert lines[0] == "Invalid parameters:" and len(lines) == 4
    assert {line.split(":")[0].strip() for line in lines[1:]} == {
        "finetune.phase1.epochs", "finetune.phase1.optimizer", "finetune.sed"
    }


def test_a_known_architecture_passes():
    cfg = parse_finetune({**BASE, "base": {"source": "keras_applications", "name": "ResNet50"}})
    assert cfg.base.name == "ResNet50"


def test_the_schema_defaults_are_those_of_the_parameters_file():
    """One default per key: conf/base/parameters_finetune.yml sets every key, and parsing it
    gives what the schema gives for the keys that have no default."""
    from pathlib import Path

    from kedro.config import OmegaConfigLoader

    conf = Path(__file__).resolve().parents[1] / "conf"
    loader = OmegaConfigLoader(str(conf), base_env="base", default_run_env="base")
    params = loader["parameters"]["finetune"]
    required = {"data": {k: params["data"][k] for k in ("path", "image_size")},
                "base": {"path": params["base"]["path"]}}
    assert parse_finetune(params).model_dump() == parse_finetune(required).model_dump()


def test_a_phase_given_in_part_keeps_its_own_defaults_and_unused_keys_are_listed():
    cfg = parse_finetune({**BASE, "phase1": {"epochs": 2}, "phase2": {"epochs": 3}})
    assert (cfg.phase1.learning_rate, cfg.phase1.optimizer) == (3e-3, "adam")
    assert (cfg.phase2.learning_rate, cfg.phase2.train.all) == (3e-4, True)
    assert (cfg.phase2.schedule, cfg.phase2.warmup_epochs) == ("cosine", 2)
    staged = parse_finetune({**BASE, "phase2": {"learning_rate": 0.1, "stages": [
        {"epochs": 1, "learning_rate": 1e-4, "train": {"top": 2}}]}})
    assert staged.ignored == {"phase2": ["learning_rate"]}
    assert [s.learning_rate for s in staged.phase2.stages_list()] == [1e-4]


def test_core_messages_get_the_parameter_keys_of_the_node_that_raised_them():
    from headswap.project.config import parameter_keys

    assert parameter_keys("`cut_at`=9 is out of range; or set `allow_unsafe`: true",
                          "load_base") == ("finetune.base.cut_at=9 is out of range; or set "
                                           "finetune.base.allow_unsafe: true")
    assert parameter_keys("Give `path` as a folder.", "ingest_images") == (
        "Give finetune.data.path as a folder.")
    assert parameter_keys("Set `image_size`: [32, 32].", "load_base") == (
        "Set finetune.data.image_size: [32, 32].")
    assert parameter_keys("`unknown` stays", "train_head") == "`unknown` stays"


def test_the_yaml_shows_the_schemas_defaults():
    """conf/base/parameters_finetune.yml states every default it lists as the schema has it."""
    import yaml

    path = Path(__file__).parents[1] / "conf/base/parameters_finetune.yml"
    shown = yaml.safe_load(path.read_text())["finetune"]
    defaults = parse_finetune({"base": {}, "data": {}}).model_dump(mode="json")
    from_yaml = parse_finetune(shown).model_dump(mode="json")

    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    listed = leaves(shown)
    differ = {key: (value, leaves(defaults).get(key)) for key, value in
              leaves(from_yaml).items() if key in listed and leaves(defaults).get(key) != value}
    assert not differ, f"YAML value vs schema default: {differ}"
    assert len(listed) > 40  # the file lists the keys, not a handful


def test_the_finetune_pipeline_has_a_node_per_phase_of_the_parameters():
    from headswap.pipelines.finetune.pipeline import PHASES, phases

    assert list(PHASES) == list(parse_finetune({"base": {}, "data": {}}).phases())
    assert [n.name for n in phases().nodes] == list(PHASES.values())
