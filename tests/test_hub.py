"""save_pretrained / from_pretrained of the classifier and the text-conditioned encoder (huggingface_hub's mixin)."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from dreamood.anchors import TokenEmbeddings
from dreamood.encoder import TextConditionedEncoder
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.models import Classifier, SmallConvNet, resnet18


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here must work with the network cut: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _changed_weights(model: nn.Module) -> nn.Module:
    """Perturb every parameter and buffer so a load that kept random weights cannot pass."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("small_input", [True, False])
def test_classifier_round_trip_gives_identical_outputs(tmp_path: Path, small_input: bool) -> None:
    model = _changed_weights(resnet18(12, small_input=small_input, seed=0)).eval()
    model.save_pretrained(tmp_path / "classifier")
    assert {p.name for p in (tmp_path / "classifier").iterdir()} >= {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["backbone"] == {"name": "resnet18", "small_input": small_input, "in_channels": 3}
    assert config["num_classes"] == 12 and config["feature_dim"] == 512

    loaded = Classifier.from_pretrained(tmp_path / "classifier")
    assert isinstance(loaded, Classifier) and not loaded.training
    assert loaded.backbone.small_input is small_input  # type: ignore[union-attr]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_classifier_with_small_conv_net_round_trips_from_a_string_path(tmp_path: Path) -> None:
    model = _changed_weights(Classifier(SmallConvNet(1, 16, width=4, seed=0), 5)).eval()
    model.save_pretrained(str(tmp_path / "c"))
    loaded = Classifier.from_pretrained(str(tmp_path / "c"))
    backbone = loaded.backbone
    assert isinstance(backbone, SmallConvNet) and (backbone.in_channels, backbone.width) == (1, 4)
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_custom_backbone_must_be_passed_again(tmp_path: Path) -> None:
    def backbone() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 6))

    model = _changed_weights(Classifier(backbone(), 3, feature_dim=6)).eval()
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["backbone"] is None
    with pytest.raises(ArtifactError, match=r"Sequential backbone.*backbone=<the module>"):
        Classifier.from_pretrained(tmp_path / "c")
    loaded = Classifier.from_pretrained(tmp_path / "c", backbone=backbone())
    images = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_encoder_round_trip_keeps_anchors_class_names_and_temperature(tmp_path: Path) -> None:
    anchors = TokenEmbeddings(["apple", "bee", "cat"], torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    encoder = _changed_weights(TextConditionedEncoder(SmallConvNet(3, 8, width=4, seed=0), 8, anchors, 0.2)).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    loaded = TextConditionedEncoder.from_pretrained(tmp_path / "encoder")
    assert loaded.class_names == ["apple", "bee", "cat"]
    assert loaded.temperature == 0.2
    assert torch.equal(loaded.anchors, encoder.anchors)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder(images), loaded(images))
        assert torch.equal(encoder.embed(images), loaded.embed(images))


def test_encoder_with_a_plain_anchor_tensor_has_no_class_names(tmp_path: Path) -> None:
    encoder = TextConditionedEncoder(SmallConvNet(3, 8, width=4, seed=0), 8, torch.randn(4, 6)).eval()
    encoder.save_pretrained(tmp_path / "e")
    loaded = TextConditionedEncoder.from_pretrained(tmp_path / "e")
    assert loaded.class_names is None and loaded.num_classes == 4


def test_a_folder_that_is_not_a_saved_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"not a folder written by Classifier.save_pretrained: missing config"):
        Classifier.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match="not a model saved by dreamood"):
        Classifier.from_pretrained(tmp_path)


def test_loading_the_wrong_class_names_the_saved_one(tmp_path: Path) -> None:
    resnet18(3, small_input=True, seed=0).save_pretrained(tmp_path / "c")
    with pytest.raises(ArtifactError, match="holds a saved Classifier"):
        TextConditionedEncoder.from_pretrained(tmp_path / "c")


def test_weights_that_do_not_fit_the_config_are_an_error(tmp_path: Path) -> None:
    resnet18(3, small_input=True, seed=0).save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["num_classes"] = 4
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="do not fit"):
        Classifier.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("name", ["runs/x/classifier", "./classifier", "/no/such/folder"])
def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Classifier.from_pretrained(name)


def test_a_hub_id_missing_from_the_cache_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor in the Hugging Face cache"):
        Classifier.from_pretrained("someone/some-classifier", local_files_only=True, cache_dir=tmp_path)


def test_saved_classifier_is_still_an_ordinary_module() -> None:
    model = resnet18(3, small_input=True, seed=0)
    clone = copy.deepcopy(model)
    assert torch.equal(clone.head.weight, model.head.weight)
    assert hasattr(model, "push_to_hub")


def test_a_hub_id_loads_from_the_hugging_face_cache(tmp_path: Path) -> None:
    model = _changed_weights(resnet18(4, small_input=True, seed=0)).eval()
    repo = tmp_path / "cache" / "models--someone--tiny-classifier"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = Classifier.from_pretrained("someone/tiny-classifier", local_files_only=True, cache_dir=tmp_path / "cache")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
