"""The packaged reference configurations and the configuration fields they use."""

from __future__ import annotations

from typing import Any

import pytest

from dreamood.config import (
    PACKAGED_CONFIGS,
    STEM_CHOICES,
    ConfigError,
    PipelineConfig,
    config_from_dict,
    load_config,
)
from dreamood.data import IMAGENET100_CLASSES, reference_words
from dreamood.decoding.injection import build_token_prompts
from dreamood.evaluation import TEMPERATURE_FORMS
from dreamood.models.resnet import STEMS

REFERENCE = ("cifar100-reference", "imagenet100-reference", "imagenet100-dream-id-reference")


def test_reference_configurations_are_packaged_and_round_trip() -> None:
    assert set(REFERENCE) <= set(PACKAGED_CONFIGS)
    for name in REFERENCE:
        config = load_config(name)
        assert config_from_dict(config.to_dict()) == config


def test_existing_configurations_keep_dreamoods_choices() -> None:
    defaults = PipelineConfig()
    for name in ("cifar100", "imagenet100", "imagenet100-dream-id"):
        config = load_config(name)
        assert config.anchors.words is None and config.anchors.subword == "mean-norm"
        assert config.generation.injection == "span" and config.generation.prompt_words is None
        assert config.generation.class_prompts == {} and config.generation.prompt == "A high-quality photo of a {}"
        assert config.bank.augment is False and config.bank.shuffle is False
        assert config.encoder.stem == config.training.stem == "auto"
        assert config.training.temperature_form == "free-energy" and config.training.loss == "energy"
        assert config.evaluation.fpr_rule == "exact" and config.evaluation.ood_subsample is None
        assert config.generation.conditioning_noise == 0.0 and config.generation.fixed_latent_seed is None
    assert defaults.evaluation.fpr_rule == "exact"


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_configuration_settings(name: str) -> None:
    config = load_config(name)
    dataset = config.benchmark
    words = reference_words(dataset)
    assert config.anchors.subword == "first" and config.anchors.words == list(words.injection_words)
    assert config.generation.injection == "token"
    assert config.generation.injection_words == list(words.injection_words)
    assert config.generation.prompt == "A high-quality image of the {}"
    assert config.encoder.stem == config.training.stem == "3x3"
    assert config.bank.augment and config.bank.shuffle
    assert config.evaluation.fpr_rule == "nearest" and config.evaluation.repeats == 1
    assert config.evaluation.ood_subsample == (2000 if dataset == "cifar100" else 960)
    # Per-class templates: the shared template, overridden for the classes the authors suffix.
    templates = [config.generation.class_prompts.get(n, config.generation.prompt) for n in words.class_names]
    assert templates == list(words.prompt_templates)
    if dataset == "cifar100":
        expected = list(words.prompt_words)
        expected[21] = "chimp"  # the one departure: their "chimpanzee" prompt holds no "chimp" token
        assert config.generation.prompt_words == expected
    else:
        assert config.generation.prompt_words == list(words.prompt_words)
        assert set(config.generation.class_prompts) <= set(IMAGENET100_CLASSES)
    if name == "imagenet100-reference":
        assert config.training.temperature_form == "scaled-logsumexp"
    if name == "imagenet100-dream-id-reference":
        assert config.method == "dream-id" and config.training.outlier_batch_size == 256


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_prompts_inject_with_the_real_clip_vocabulary(clip_tokenizer: Any, name: str) -> None:
    config = load_config(name)
    words = reference_words(config.benchmark)
    templates = [config.generation.class_prompts.get(n, config.generation.prompt) for n in words.class_names]
    assert config.generation.prompt_words is not None and config.generation.injection_words is not None
    first = [clip_tokenizer(w, add_special_tokens=False).input_ids[0] for w in config.generation.injection_words]
    tokens = build_token_prompts(clip_tokenizer, templates, config.generation.prompt_words, first)
    assert tokens.slot_mask is not None and bool(tokens.slot_mask.any(dim=1).all())
    # The prompt ids are the plain prompts' ids: "A high-quality image of the" then the word.
    prefix = clip_tokenizer("A high-quality image of the", add_special_tokens=False).input_ids
    for row in range(100):
        ids = tokens.input_ids[row].tolist()
        if not templates[row].startswith("A high-quality image of the wire"):
            assert ids[1 : 1 + len(prefix)] == prefix
    if config.benchmark == "cifar100":
        with pytest.raises(ValueError, match=r"class 21 \('chimpanzee'\)"):
            build_token_prompts(
                clip_tokenizer, templates, words.prompt_words, first, class_names=list(words.class_names)
            )


def test_new_fields_are_validated() -> None:
    cases = {
        "encoder.stem": "5x5",
        "training.stem": "big",
        "training.temperature_form": "energy",
        "training.loss": "vos",
        "evaluation.fpr_rule": "interpolated",
        "evaluation.ood_subsample": 0,
        "generation.injection": "row",
        "generation.conditioning_noise": -0.1,
        "generation.fixed_latent_seed": -1,
        "generation.class_prompts": {"kite": "a kite"},
        "anchors.words": ["apple", ""],
        "anchors.subword": "last",
    }
    for key, value in cases.items():
        with pytest.raises(ConfigError):
            PipelineConfig().replace(**{key: value})
    with pytest.raises(ConfigError, match="injection_words are used by injection = 'token' only"):
        PipelineConfig().replace(**{"generation.injection_words": ["a"] * 100})
    with pytest.raises(ConfigError, match="anchors.words has 2 words but the benchmark has 100 classes"):
        PipelineConfig().replace(**{"anchors.words": ["a", "b"]})
    folder = PipelineConfig().replace(**{"benchmark": "folder", "anchors.words": ["a", "b"]})
    assert folder.anchors.words == ["a", "b"]


def test_choice_lists_agree_with_the_library() -> None:
    assert STEM_CHOICES == STEMS
    assert TEMPERATURE_FORMS == ("free-energy", "scaled-logsumexp")
