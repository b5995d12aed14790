"""The strict configuration loader and the packaged paper configurations."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.config import (
    PACKAGED_CONFIGS,
    ConfigError,
    GenerationConfig,
    PipelineConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    packaged_config_path,
)

# The reference settings of /work/shared/DESIGN.md (from the paper and its public code), typed in by hand.
PAPER = {
    "cifar100": {
        "encoder": {"backbone": "resnet34", "epochs": 200, "batch_size": 256, "lr": 0.1, "temperature": 0.1},
        "bank": {"per_class": 500},
        "sampler": {
            "k": 300,
            "boundary": 50,
            "anchors_per_round": 50,
            "candidates_per_anchor": 1500,
            "sigma": 0.07,
            "keep": 2,
            "num_per_class": 10000,
        },
        "generation": {
            "steps": 50,
            "guidance_scale": 7.5,
            "height": 512,
            "width": 512,
            "save_size": 256,
            "images_per_class": 1000,
            "scheduler": "pndm",
            "model": "CompVis/stable-diffusion-v1-4",
        },
        "training": {
            "epochs": 200,
            "lr": 0.1,
            "batch_size": 256,
            "outlier_batch_size": 256,
            "beta": 2.5,
            "head": "linear",
            "weight_decay": 5e-4,
            "momentum": 0.9,
            "pretrain_epochs": 0,
        },
        "data": {"ood_sets": ["Textures", "SVHN", "Places365", "LSUN-C", "iSUN"]},
    },
    "imagenet100": {
        "encoder": {"backbone": "resnet34", "epochs": 100, "batch_size": 160, "temperature": 0.1},
        "bank": {"per_class": 1000},
        "sampler": {"k": 300, "boundary": 200, "sigma": 0.03, "keep": 2, "num_per_class": 10000},
        "generation": {"steps": 50, "guidance_scale": 7.5, "save_size": 256, "images_per_class": 1000},
        "training": {
            "epochs": 20,
            "lr": 0.001,
            "batch_size": 80,
            "outlier_batch_size": 80,
            "beta": 1.0,
            "head": "mlp",
            "hidden_dim": 512,
        },
        "data": {"ood_sets": ["iNaturalist", "SUN", "Places", "Textures"]},
    },
    "imagenet100-dream-id": {
        "sampler": {"sigma": 0.01, "keep": 1},
        "training": {"pretrain_epochs": 0},
    },
}
# The reference configurations keep every paper setting of the configuration they derive from.
for _base in ("cifar100", "imagenet100", "imagenet100-dream-id"):
    PAPER[f"{_base}-reference"] = PAPER[_base]


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_hold_the_paper_settings(name: str) -> None:
    config = load_config(name)
    assert packaged_config_path(name).is_file()
    for section, values in PAPER[name].items():
        for key, expected in values.items():
            assert getattr(getattr(config, section), key) == expected, f"{name}: {section}.{key}"
    assert config.benchmark == ("cifar100" if name.startswith("cifar100") else "imagenet100")
    assert config.method == ("dream-id" if "dream-id" in name else "dream-ood")


def test_dataclass_defaults_are_the_cifar100_paper_settings() -> None:
    defaults, packaged = PipelineConfig().to_dict(), load_config("cifar100").to_dict()
    for section in ("encoder", "bank", "sampler", "generation", "training", "evaluation", "anchors"):
        assert defaults[section] == packaged[section], section


def test_toml_yaml_and_json_give_the_same_config(tmp_path: Path) -> None:
    values = {
        "benchmark": "imagenet100",
        "seed": 3,
        "sampler": {"sigma": 0.05, "k": 10},
        "data": {"ood_paths": {"SUN": "/data/SUN"}, "ood_sets": ["SUN"]},
        "training": {"init_checkpoint": "ce.pt", "beta": 1},
    }
    toml_path = tmp_path / "run.toml"
    toml_path.write_text(
        'benchmark = "imagenet100"\nseed = 3\n[sampler]\nsigma = 0.05\nk = 10\n'
        '[data]\nood_sets = ["SUN"]\n[data.ood_paths]\nSUN = "/data/SUN"\n'
        '[training]\ninit_checkpoint = "ce.pt"\nbeta = 1\n'
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "run.json").write_text(json.dumps(values))
    configs = [load_config(tmp_path / f"run.{suffix}") for suffix in ("toml", "yaml", "json")]
    assert configs[0] == configs[1] == configs[2]
    config = configs[0]
    assert config.sampler.sigma == 0.05 and config.sampler.k == 10
    assert config.training.beta == 1.0 and isinstance(config.training.beta, float)
    assert config.data.ood_paths == {"SUN": "/data/SUN"}
    assert config.encoder.epochs == PipelineConfig().encoder.epochs  # untouched keys keep their defaults
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[training]\nepoch = 3\n", r"unknown key 'training.epoch' \(did you mean 'training.epochs'\?\)"),
        ("bechmark = 'cifar100'\n", r"unknown key 'bechmark' \(did you mean 'benchmark'\?\)"),
        ("[trainer]\nepochs = 3\n", r"unknown key 'trainer'"),
        ("[training]\nepochs = '3'\n", r"training.epochs must be an int, got str '3'"),
        ("[training]\nepochs = 2.0\n", r"training.epochs must be an int, got float 2.0"),
        ("[training]\nepochs = true\n", r"training.epochs must be an int, got bool True"),
        ("[sampler]\nsigma = 'big'\n", r"sampler.sigma must be a number"),
        ("progress = 1\n", r"progress must be true or false"),
        ("[data]\nood_sets = ['SVHN', 3]\n", r"data.ood_sets\[1\] must be a string, got int 3"),
        ("[data]\nood_paths = {SVHN = 3}\n", r"data.ood_paths.SVHN must be a string"),
        ("training = 3\n", r"training must be a table, got int 3"),
        ("[sampler]\nsigma = -0.1\n", r"sampler.sigma must be > 0, got -0.1"),
        ("[sampler]\nkeep = 5\ncandidates_per_anchor = 4\n", r"sampler.keep \(5\) must not exceed"),
        ("[generation]\nheight = 100\n", r"generation.height must be a multiple of 8"),
        ("[generation]\nprompt = 'a photo'\n", r"generation.prompt must hold exactly one"),
        ("[generation]\ncompile_mode = 'fast'\n", r"generation.compile_mode must be one of 'default'"),
        ("[training]\ncompile_mode = 'default'\n", r"training.compile_mode='default' needs compile = true"),
        ("[generation]\nwriter_threads = -1\n", r"generation.writer_threads must be >= 0, got -1"),
        ("[generation]\nscheduler = 'heun'\n", r"generation.scheduler must be one of 'pndm', .*'lcm'"),
        ("[generation]\nlora_scale = nan\n", r"generation.lora_scale must be a finite number"),
        ("[generation]\nlora = ''\n", r"generation.lora must be a LoRA folder"),
        ("[training]\nhead = 'deep'\n", r"training.head must be one of 'linear', 'mlp', got 'deep'"),
        ("method = 'vos'\n", r"method must be one of"),
        (
            "[sampler]\nnum_per_class = 10\n",
            r"generation.images_per_class \(1000\) must not exceed sampler.num_per_class",
        ),
        ("[training\n", r"is not valid TOML"),
    ],
)
def test_bad_files_give_one_error_naming_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_other_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configuration file not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "run.ini").write_text("[x]\n")
    with pytest.raises(ConfigError, match="unsupported configuration format"):
        load_config(tmp_path / "run.ini")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a table of keys"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="no packaged configuration 'mnist'"):
        packaged_config_path("mnist")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == PipelineConfig()


def test_overrides_parse_values_as_toml_literals() -> None:
    config = load_config(
        "cifar100",
        {
            "training.epochs": "2",
            "sampler.sigma": "0.5",
            "data.ood_sets": '["SVHN", "iSUN"]',
            "data.root": "/data/cifar",
            "training.init_checkpoint": "ce.pt",
            "generation.save_size": "null",
            "progress": "false",
            "seed": 7,
        },
    )
    assert config.training.epochs == 2
    assert config.sampler.sigma == 0.5
    assert config.data.ood_sets == ["SVHN", "iSUN"]
    assert config.data.root == "/data/cifar"
    assert config.training.init_checkpoint == "ce.pt"
    assert config.generation.save_size is None
    assert config.progress is False
    assert config.seed == 7
    assert config.replace(**{"bank.per_class": 3}).bank.per_class == 3
    with pytest.raises(
        ConfigError, match=r"unknown key 'training.epoch' in overrides \(did you mean 'training.epochs'"
    ):
        apply_overrides(config, {"training.epoch": 1})
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        apply_overrides(config, {"trainer.epochs": 1})
    with pytest.raises(ConfigError, match="training.epochs must be an int, got str 'many'"):
        apply_overrides(config, {"training.epochs": "many"})


@settings(max_examples=25, deadline=None)
@given(
    epochs=st.integers(1, 10**6),
    sigma=st.floats(1e-6, 10.0, allow_nan=False),
    name=st.text(min_size=1, max_size=12).filter(lambda text: text.strip() not in ("", "null", "none", "None")),
)
def test_override_strings_round_trip(epochs: int, sigma: float, name: str) -> None:
    config = apply_overrides(
        PipelineConfig(), {"training.epochs": str(epochs), "sampler.sigma": repr(sigma), "output_dir": name}
    )
    assert config.training.epochs == epochs
    assert config.sampler.sigma == sigma
    assert config.output_dir == name  # a string key keeps the text as it is, even "123" or "[1]"


def test_few_step_generation_settings_load(tmp_path: Path) -> None:
    path = tmp_path / "lcm.toml"
    path.write_text(
        "[generation]\nscheduler = 'lcm'\nsteps = 4\nguidance_scale = 1.0\nlora = 'lcm-lora'\nlora_scale = 1\n"
    )
    generation = load_config(path).generation
    assert (generation.scheduler, generation.steps, generation.lora, generation.lora_scale) == ("lcm", 4, "lcm-lora", 1)
    assert GenerationConfig().lora is None and GenerationConfig().lora_scale == 1.0


# ---- the [training] section is the training loop's TrainingConfig plus the run's model and batch settings ---------


def test_training_section_extends_the_loop_config(tmp_path: Path) -> None:
    loop_fields = [item.name for item in dataclasses.fields(TrainingConfig)]
    assert [item.name for item in dataclasses.fields(TrainConfig)][: len(loop_fields)] == loop_fields
    section = TrainConfig()
    assert isinstance(section, TrainingConfig)
    # The paper's CIFAR-100 recipe; every other loop field keeps the loop's default.
    assert (section.epochs, section.beta) == (200, 2.5)
    loop = TrainingConfig(epochs=200, beta=2.5)
    assert {name: getattr(section, name) for name in loop_fields} == loop.to_dict()
    path = tmp_path / "run.toml"
    path.write_text("[training]\nnesterov = false\nmin_lr = 0.001\nood_start_epoch = 3\nsync_every = 1\n")
    config = load_config(path)
    assert (config.training.nesterov, config.training.min_lr) == (False, 0.001)
    assert (config.training.ood_start_epoch, config.training.sync_every) == (3, 1)
    assert apply_overrides(config, {"training.sync_every": "4"}).training.sync_every == 4
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr = -1.0\n", r"training.lr must be a finite number > 0, got -1.0"),
        ("min_lr = 0.5\n", r"training.min_lr must not exceed lr, got min_lr=0.5 and lr=0.1"),
        ("momentum = 0.0\n", r"training.nesterov=True needs momentum > 0"),
        ("sync_every = 0\n", r"training.sync_every must be > 0, got 0"),
        ("ood_start_epoch = -1\n", r"training.ood_start_epoch must be >= 0, got -1"),
        ("amp = 'fp8'\n", r"training.amp must be one of 'bf16', 'fp16', got 'fp8'"),
        ("compile_mode = 'fast'\ncompile = true\n", r"training.compile_mode must be one of 'default'"),
        ("batch_size = 0\n", r"training.batch_size must be > 0, got 0"),
    ],
)
def test_bad_training_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[training]\n" + text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_loop_config_checks_types_and_ranges_without_torch() -> None:
    with pytest.raises(ConfigError, match="epochs must be > 0, got 0"):
        TrainingConfig(epochs=0)
    with pytest.raises(TypeError, match="epochs must be an int, got float 2.0"):
        TrainingConfig(epochs=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lr must be a number, got str 'fast'"):
        TrainingConfig(epochs=1, lr="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="beta must be a finite number >= 0, got inf"):
        TrainingConfig(epochs=1, beta=float("inf"))
    code = "import sys, dreamood.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
