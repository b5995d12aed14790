"""Saving and loading trained models the Hugging Face way: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

:class:`~dreamood.models.Classifier` and :class:`~dreamood.encoder.TextConditionedEncoder` inherit
:class:`DreamoodHubMixin` (a :class:`huggingface_hub.PyTorchModelHubMixin`). A saved model is a folder with

- ``config.json``: what rebuilds the module (``dreamood_class``, the backbone's description, sizes, class names);
- ``model.safetensors``: the weights (nothing is pickled);
- ``README.md``: a model card, written by ``huggingface_hub``.

The backbones the library builds (``resnet18``/``resnet34``/``resnet50`` with or without the small-input stem,
and ``SmallConvNet``) are described in the config and rebuilt on load. Any other backbone is saved with its
weights but ``"backbone": null`` in the config; load it by passing the module again:
``Classifier.from_pretrained(folder, backbone=my_backbone)``.

A local folder is read without touching the network. A string that is not a local path is taken as a Hugging
Face Hub model id and downloaded unless ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from dreamood.errors import ArtifactError, ModelNotFoundError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "DreamoodHubMixin", "backbone_config", "backbone_from_config"]

#: File name of the configuration in a saved model folder.
CONFIG_NAME = "config.json"
#: File name of the weights in a saved model folder.
WEIGHTS_NAME = "model.safetensors"

_RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}

T = TypeVar("T", bound="DreamoodHubMixin")


def backbone_config(backbone: nn.Module) -> dict[str, Any] | None:
    """A JSON description of a backbone the library can rebuild, or ``None`` for any other module.

    Args:
        backbone: A :class:`~dreamood.models.ResNetFeatures`, a :class:`~dreamood.models.SmallConvNet` or any
            other feature extractor.

    Returns:
        ``{"name": "resnet34", "small_input": True, "in_channels": 3}`` for a ResNet,
        ``{"name": "small", "in_channels": 3, "feature_dim": 64, "width": 16}`` for a ``SmallConvNet``, ``None``
        otherwise.
    """
    from dreamood.models import ResNetFeatures, SmallConvNet

    if type(backbone) is ResNetFeatures:
        return {
            "name": f"resnet{backbone.depth}",
            "small_input": backbone.small_input,
            "in_channels": backbone.in_channels,
        }
    if type(backbone) is SmallConvNet:
        return {
            "name": "small",
            "in_channels": backbone.in_channels,
            "feature_dim": backbone.feature_dim,
            "width": backbone.width,
        }
    return None


def backbone_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a backbone (randomly initialised) from its :func:`backbone_config` description.

    Raises:
        ArtifactError: The description is not one :func:`backbone_config` writes.
    """
    from dreamood.models import ResNetFeatures, SmallConvNet

    name = config.get("name") if isinstance(config, dict) else None
    try:
        if name in _RESNET_DEPTHS:
            return ResNetFeatures(
                _RESNET_DEPTHS[str(name)],
                small_input=bool(config["small_input"]),
                in_channels=int(config["in_channels"]),
            )
        if name == "small":
            return SmallConvNet(int(config["in_channels"]), int(config["feature_dim"]), width=int(config["width"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(
            f"backbone description {config!r} in {CONFIG_NAME} is incomplete or invalid: {error}"
        ) from error
    raise ArtifactError(
        f"backbone description {config!r} in {CONFIG_NAME} names no backbone dreamood builds "
        f"(expected name one of {', '.join([*_RESNET_DEPTHS, 'small'])})"
    )


def _looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a path (a Hub id is ``name`` or ``owner/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


class DreamoodHubMixin(
    PyTorchModelHubMixin,
    library_name="dreamood",
    repo_url="https://github.com/deeplearning-wisc/dream-ood",
    paper_url="https://arxiv.org/abs/2309.13415",
    tags=["out-of-distribution-detection", "dreamood"],
):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for dreamood modules (``huggingface_hub``'s mixin).

    A subclass implements :meth:`_dreamood_config` (what rebuilds it, JSON) and :meth:`_from_dreamood_config`
    (an instance with the right shapes, weights still random); the mixin writes and reads ``config.json``,
    ``model.safetensors`` (loaded strictly: every tensor must match) and a model card.
    """

    def _dreamood_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_dreamood_config(cls: type[T], config: dict[str, Any], backbone: nn.Module) -> T:
        raise NotImplementedError

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        config = {"dreamood_class": type(self).__name__, **self._dreamood_config()}
        module = self if isinstance(self, nn.Module) else None
        if module is None:  # pragma: no cover - every subclass is an nn.Module
            raise TypeError(f"{type(self).__name__} is not a torch.nn.Module")
        save_model(module, str(save_directory / WEIGHTS_NAME))
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls: type[T],
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> T:
        """Load a model saved with ``save_pretrained``: a local folder (never the network) or a Hub model id.

        The module is returned in evaluation mode (``model.train()`` to train it further).

        Args:
            pretrained_model_name_or_path: A folder written by ``save_pretrained`` (e.g. ``"runs/x/classifier"``)
                or a Hugging Face Hub model id (``"owner/name"``).
            force_download: Download again even when cached (Hub ids only).
            token: Hugging Face token for private repositories (Hub ids only).
            cache_dir: Hugging Face cache folder (Hub ids only).
            local_files_only: Only look in the Hugging Face cache for a Hub id, never download.
            revision: Branch, tag or commit of a Hub repository.
            **model_kwargs: ``backbone=`` a module to use instead of the one described in the config (needed when
                the model was saved with a backbone dreamood does not build), ``map_location=`` the device the
                weights are loaded onto (default ``"cpu"``).

        Raises:
            ModelNotFoundError: The local folder does not exist, or the Hub model is not in the cache with
                ``local_files_only=True``.
            ArtifactError: The folder is not a saved model of this class (no ``config.json``, no
                ``model.safetensors``, another class), or the weights do not fit.
        """
        name = os.fspath(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_dir():
            _check_saved_folder(path, cls.__name__)
            name = str(path)
        elif _looks_like_local_path(name):
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ModelNotFoundError(
                f"{cls.__name__}.from_pretrained: {name!r} {what}; expected a folder written by "
                f"save_pretrained (holding {CONFIG_NAME} and {WEIGHTS_NAME}) or a Hugging Face Hub id 'owner/name'"
            )
        else:
            from huggingface_hub.errors import LocalEntryNotFoundError

            try:
                return super().from_pretrained(  # type: ignore[misc]
                    name,
                    force_download=force_download,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    revision=revision,
                    **model_kwargs,
                )
            except LocalEntryNotFoundError as error:
                raise ModelNotFoundError(
                    f"{cls.__name__}.from_pretrained: {name!r} is neither a local folder nor in the Hugging Face "
                    f"cache ({error}). Pass the folder written by save_pretrained, or allow the download with "
                    "local_files_only=False."
                ) from error
        return super().from_pretrained(name, local_files_only=True, **model_kwargs)  # type: ignore[misc,no-any-return]

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> T:
        from safetensors.torch import load_model

        if config is None:
            raise ArtifactError(
                f"{model_id!r} has no {CONFIG_NAME}: it was not written by {cls.__name__}.save_pretrained"
            )
        _check_config_class(config, cls.__name__, model_id)
        backbone = model_kwargs.get("backbone")
        if not isinstance(backbone, nn.Module):
            backbone = _saved_backbone(config, cls.__name__)
        instance = cls._from_dreamood_config(config, backbone)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        module = instance if isinstance(instance, nn.Module) else None
        if module is None:  # pragma: no cover - every subclass is an nn.Module
            raise TypeError(f"{cls.__name__} is not a torch.nn.Module")
        try:
            load_model(module, weights, strict=strict, device=map_location)
        except RuntimeError as error:
            raise ArtifactError(
                f"the weights in {weights} do not fit the {cls.__name__} of its config: {error}"
            ) from error
        module.eval()
        return instance


def _saved_backbone(config: dict[str, Any], class_name: str) -> nn.Module:
    """The backbone described by a saved config; a clear error when it was a module dreamood does not build."""
    description = config.get("backbone")
    if description is None:
        raise ArtifactError(
            f"this {class_name} was saved with a {config.get('backbone_class', 'custom')} backbone that dreamood "
            f"cannot rebuild; pass it again: {class_name}.from_pretrained(folder, backbone=<the module>)"
        )
    if not isinstance(description, dict):
        raise ArtifactError(f"'backbone' in {CONFIG_NAME} must be a JSON object or null, got {description!r}")
    return backbone_from_config(description)


def _check_saved_folder(path: Path, class_name: str) -> None:
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise ArtifactError(
            f"{str(path)!r} is not a folder written by {class_name}.save_pretrained: missing {' and '.join(missing)}"
        )
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{str(path / CONFIG_NAME)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ArtifactError(f"{str(path / CONFIG_NAME)!r} holds {type(config).__name__}, expected a JSON object")
    _check_config_class(config, class_name, str(path))


def _check_config_class(config: dict[str, Any], class_name: str, where: str) -> None:
    saved = config.get("dreamood_class")
    if saved != class_name:
        what = f"a saved {saved}" if isinstance(saved, str) else "not a model saved by dreamood"
        raise ArtifactError(
            f"{where!r} holds {what} ({CONFIG_NAME} has dreamood_class={saved!r}); "
            f"{class_name}.from_pretrained needs a folder written by {class_name}.save_pretrained"
        )
