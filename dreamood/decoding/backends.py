"""One decoder per text-to-image model family, chosen from the model folder, with anchors that fit it.

A diffusers model folder names its pipeline class in ``model_index.json`` (``"_class_name"``). The families
dreamood decodes with are those whose text side is one or more CLIP token-embedding tables, where a sampled
vector can take a class token's place:

| ``_class_name`` (models) | decoder | anchors ``T(y)`` |
|---|---|---|
| ``StableDiffusionPipeline`` (SD 1.x, 2.x, SD-Turbo) | ``StableDiffusionDecoder`` | the CLIP row: 768-d, 1024-d (2.x) |
| ``StableDiffusionXLPipeline`` (SDXL, SDXL-Turbo) | ``StableDiffusionXLDecoder`` | both rows: 768 + 1280 = 2048-d |

:func:`load_decoder` and :func:`load_anchors` dispatch on the folder's pipeline class; :func:`check_anchors`
tells, before any training, whether a set of anchors fits a decoder or a model folder. Any other pipeline class
is refused with one error that says what it would take (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamood._utils import DeviceLike
from dreamood.anchors import SUBWORD_POLICIES, TokenEmbeddings
from dreamood.errors import ModelNotFoundError

__all__ = [
    "FAMILIES",
    "UNSUPPORTED",
    "AnchorMismatchError",
    "ModelInfo",
    "UnsupportedModelError",
    "check_anchors",
    "inspect_model",
    "load_anchors",
    "load_decoder",
]

#: Supported pipeline classes (``model_index.json``'s ``_class_name``) and their family names.
FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
}

_TEXT_PARTS: dict[str, tuple[str, ...]] = {
    "stable-diffusion": ("text_encoder",),
    "stable-diffusion-xl": ("text_encoder", "text_encoder_2"),
}

_T5 = (
    "its text side includes a T5 encoder, whose token states are not a CLIP token table: a backend would need "
    "anchors taken from T5's input embedding table (and Phase 1 trained at its width), injection of the sampled "
    "vector into every text encoder the model conditions on (as the Stable Diffusion XL decoder does for two), "
    "and a test that decoding T(y) reproduces the plain prompt's image"
)

#: Pipeline classes dreamood knows but does not decode with, and what a backend for them would need.
UNSUPPORTED: dict[str, str] = {
    "FluxPipeline": f"FLUX.1 conditions on T5-XXL token states (4096-d) and a pooled CLIP ViT-L embedding; {_T5}",
    "StableDiffusion3Pipeline": (
        "Stable Diffusion 3 conditions on CLIP ViT-L (768-d), OpenCLIP ViT-bigG (1280-d) and T5-XXL (4096-d) at "
        f"once; {_T5}"
    ),
    "PixArtAlphaPipeline": f"PixArt-alpha conditions on T5-XXL alone; {_T5}",
    "PixArtSigmaPipeline": f"PixArt-sigma conditions on T5-XXL alone; {_T5}",
    "IFPipeline": f"DeepFloyd IF conditions on T5-XXL and renders in pixel space in stages; {_T5}",
    "KandinskyV22Pipeline": (
        "Kandinsky 2.2 is conditioned on CLIP *image* embeddings made by a separate prior; a backend would inject "
        "into the prior's text encoder and run the prior and the decoder"
    ),
    "KandinskyV22CombinedPipeline": "Kandinsky 2.2 conditions on image embeddings made by a separate prior",
    "LatentConsistencyModelPipeline": (
        "a fully LCM-distilled model; use its base Stable Diffusion model with an LCM-LoRA instead "
        "(scheduler='lcm', lora=<LCM-LoRA folder>)"
    ),
    "StableDiffusionXLImg2ImgPipeline": (
        "an image-to-image pipeline (e.g. the SDXL refiner), not text-to-image; decode with the SDXL base model"
    ),
    "StableDiffusionImg2ImgPipeline": "an image-to-image pipeline, not text-to-image",
}


class UnsupportedModelError(ValueError):
    """The model folder holds a pipeline family dreamood has no decoder for."""


class AnchorMismatchError(ValueError):
    """Anchors, a model's token tables and a decoder do not agree (width, classes or the rows themselves)."""


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect_model` reads from a model folder without loading any weights.

    Attributes:
        source: The local folder (or the model id when downloads are allowed and it is not cached).
        pipeline_class: ``model_index.json``'s ``_class_name``.
        family: ``"stable-diffusion"`` or ``"stable-diffusion-xl"``.
        token_widths: Width of each text encoder's input token table, in the model's order.
        vocab_sizes: Number of rows of each table.
    """

    source: str
    pipeline_class: str
    family: str
    token_widths: tuple[int, ...]
    vocab_sizes: tuple[int, ...]

    @property
    def embedding_dim(self) -> int:
        """Width of the anchors and of the vectors the family's decoder accepts (the widths summed)."""
        return sum(self.token_widths)


def _local_folder(model: str, local_files_only: bool) -> Path | None:
    from dreamood.pretrained import _cached_snapshot

    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.startswith((".", "/", "~")):
        return None
    cached = _cached_snapshot(model)
    if cached is None and local_files_only:
        return None
    return cached


def _read_json(model: str, folder: Path | None, filename: str, local_files_only: bool) -> dict[str, Any] | None:
    if folder is not None:
        file = folder / filename
        if not file.is_file():
            return None
        text = file.read_text(encoding="utf-8")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            text = Path(hf_hub_download(model, filename, local_files_only=local_files_only)).read_text(encoding="utf-8")
        except EntryNotFoundError:
            return None
        except OSError as error:
            raise ModelNotFoundError(f"could not fetch {filename} of {model!r}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"{filename} of {model!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{filename} of {model!r} does not hold a JSON object")
    return data


def _family_error(model: str, pipeline_class: str, index: dict[str, Any]) -> UnsupportedModelError:
    supported = ", ".join(f"{name} ({family})" for name, family in FAMILIES.items())
    why = UNSUPPORTED.get(pipeline_class)
    if why is None:
        parts = {k: v[1] for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list)}
        t5 = any("T5" in str(name) for name in parts.values())
        why = _T5 if t5 else "dreamood has no decoder for it"
        if parts:
            why += f" (its text encoders: {', '.join(f'{k}: {v}' for k, v in sorted(parts.items()))})"
    return UnsupportedModelError(
        f"model {model!r} is a {pipeline_class}, which dreamood cannot decode with: {why}. Supported pipeline "
        f"classes: {supported}."
    )


def inspect_model(model: str | os.PathLike[str], *, local_files_only: bool = True) -> ModelInfo:
    """Read a model's pipeline class and token-table widths from its ``model_index.json`` and text-encoder configs.

    No weights are loaded.

    Args:
        model: A diffusers model folder, or a model id (looked up in the Hugging Face cache, or downloaded when
            ``local_files_only`` is false: the JSON files only).
        local_files_only: Never touch the network.

    Returns:
        The model's description.

    Raises:
        ModelNotFoundError: The folder, its ``model_index.json`` or a text encoder's ``config.json`` is missing.
        UnsupportedModelError: The pipeline class is not one of :data:`FAMILIES` (the message says what a
            backend for it would need).
    """
    name = os.fspath(model)
    folder = _local_folder(name, local_files_only)
    if folder is None and (local_files_only or name.startswith((".", "/", "~"))):
        raise ModelNotFoundError(
            f"pretrained model {name!r} was not found: no such folder and not in the Hugging Face cache. Download it "
            f"once with `hf download {name} --local-dir <folder>` and pass that folder, or allow downloads "
            "(local_files_only=False)"
        )
    index = _read_json(name, folder, "model_index.json", local_files_only)
    if index is None:
        raise ModelNotFoundError(
            f"model {name!r} has no model_index.json, so its pipeline family is unknown. A diffusers model folder "
            "(as written by `hf download` or `pipeline.save_pretrained`) holds one; supported: "
            f"{', '.join(FAMILIES)}"
        )
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class not in FAMILIES:
        raise _family_error(name, pipeline_class or "<no _class_name>", index)
    family = FAMILIES[pipeline_class]
    widths: list[int] = []
    vocab: list[int] = []
    for part in _TEXT_PARTS[family]:
        config = _read_json(name, None if folder is None else folder / part, "config.json", local_files_only)
        if config is None and folder is None:
            config = _read_json(name, None, f"{part}/config.json", local_files_only)
        if config is None:
            raise ModelNotFoundError(f"model {name!r} ({pipeline_class}) is incomplete: {part}/config.json is missing")
        text = config.get("text_config", config)
        try:
            widths.append(int(text["hidden_size"]))
            vocab.append(int(text["vocab_size"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelNotFoundError(
                f"{part}/config.json of {name!r} lacks an integer hidden_size and vocab_size ({error!r})"
            ) from error
    source = str(folder) if folder is not None else name
    return ModelInfo(source, pipeline_class, family, tuple(widths), tuple(vocab))


def load_decoder(
    model: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    local_files_only: bool = True,
    **settings: Any,
) -> Any:
    """Load the decoder of a model folder's family (an :class:`~dreamood.protocols.EmbeddingDecoder`).

    ``StableDiffusionPipeline`` folders (SD v1.x, 2.x, SD-Turbo) give a
    :class:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder`, ``StableDiffusionXLPipeline`` folders
    (SDXL, SDXL-Turbo) a :class:`~dreamood.decoding.sdxl.StableDiffusionXLDecoder`; ``settings`` go to the
    decoder's ``from_pretrained`` unchanged (``scheduler``, ``lora``, ``num_inference_steps``,
    ``guidance_scale``, ``torch_dtype``, ``device``, the speed-ups, ...).

    Args:
        model: A diffusers model folder or model id.
        class_names: Class names, indexed by label.
        local_files_only: Never download.
        **settings: The decoder's settings.

    Returns:
        The decoder.

    Raises:
        ModelNotFoundError: The model is missing or incomplete.
        UnsupportedModelError: The folder holds another pipeline family (FLUX, SD3, ...).
        ValueError: A setting is invalid.
    """
    info = inspect_model(model, local_files_only=local_files_only)
    if info.family == "stable-diffusion-xl":
        from dreamood.decoding.sdxl import StableDiffusionXLDecoder

        return StableDiffusionXLDecoder.from_pretrained(
            info.source, class_names, local_files_only=local_files_only, **settings
        )
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    return StableDiffusionDecoder.from_pretrained(
        info.source, class_names, local_files_only=local_files_only, **settings
    )


def load_anchors(
    model: str | os.PathLike[str],
    class_names: Sequence[str],
    subword: str = "mean",
    *,
    words: Sequence[str] | None = None,
    local_files_only: bool = True,
    device: DeviceLike = "cpu",
) -> TokenEmbeddings:
    """The anchors ``T(y)`` of a model, in the form its family's decoder accepts.

    A ``StableDiffusionPipeline`` folder gives each class's row of its CLIP input token table
    (:meth:`TokenEmbeddings.from_pretrained`); a ``StableDiffusionXLPipeline`` folder the rows of both tables,
    concatenated (:meth:`TokenEmbeddings.from_text_encoders`); only the tokenizers and text encoders are loaded.
    A folder without ``model_index.json`` is read as :meth:`TokenEmbeddings.from_pretrained` reads it (a plain
    CLIP text model, say).

    Args:
        model: A diffusers model folder or model id, or a CLIP text model folder.
        class_names: Class names, indexed by label.
        subword: Multi-token policy (see :meth:`TokenEmbeddings.from_text_encoder`).
        words: Per class, the word whose tokens give its anchor instead of its name (Stable Diffusion v1.x and
            2.x only), as :meth:`TokenEmbeddings.from_pretrained` takes them.
        local_files_only: Never download.
        device: Device of the returned vectors.

    Returns:
        The anchors.

    Raises:
        ModelNotFoundError: The model is missing or incomplete.
        UnsupportedModelError: The folder holds a pipeline family without a decoder.
        ValueError: As :meth:`TokenEmbeddings.from_text_encoder`.
    """
    try:
        info = inspect_model(model, local_files_only=local_files_only)
    except ModelNotFoundError as error:
        if "model_index.json" not in str(error):
            raise
        return TokenEmbeddings.from_pretrained(
            model, class_names, subword, words=words, local_files_only=local_files_only, device=device
        )
    if info.family == "stable-diffusion":
        return TokenEmbeddings.from_pretrained(
            info.source, class_names, subword, words=words, local_files_only=local_files_only, device=device
        )
    if words is not None:
        raise ValueError(
            f"per-class anchor words are supported for Stable Diffusion v1.x and 2.x, not for {info.family} "
            f"({os.fspath(model)}); leave anchors.words unset"
        )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(info.source, subfolder=sub, **kwargs) for sub in ("tokenizer", "tokenizer_2")
        ]
        encoders = [
            CLIPTextModel.from_pretrained(info.source, subfolder="text_encoder", **kwargs),
            CLIPTextModelWithProjection.from_pretrained(info.source, subfolder="text_encoder_2", **kwargs),
        ]
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"could not load the tokenizers and text encoders of {os.fspath(model)!r}: {error}. A Stable Diffusion XL "
            "folder holds tokenizer/, tokenizer_2/, text_encoder/ and text_encoder_2/"
        ) from error
    return TokenEmbeddings.from_text_encoders(tokenizers, encoders, class_names, subword, device=device)


def _decoder_tables(decoder: Any) -> tuple[list[Any], list[Any]] | None:
    pipeline = getattr(decoder, "pipeline", None)
    if pipeline is None or getattr(pipeline, "tokenizer", None) is None:
        return None
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return [pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder, pipeline.text_encoder_2]
    return [pipeline.tokenizer], [pipeline.text_encoder]


def check_anchors(
    anchors: TokenEmbeddings,
    target: Any,
    *,
    local_files_only: bool = True,
    rtol: float = 1e-2,
) -> None:
    """Raise a clear error unless ``anchors`` fit ``target``: a decoder, a :class:`ModelInfo` or a model folder.

    Checked: the width (the anchors' ``dim`` against the model's token tables, summed for SDXL); with a decoder,
    the class names, and, for anchors taken from token tables with the ``"mean"`` or ``"first"`` policy, that the
    vectors are the decoder's own table rows (up to ``rtol`` of each anchor's norm, so half-precision weights
    pass). Call it before Phase 1: an encoder trained on anchors of another width or model cannot be decoded.

    Args:
        anchors: The anchors.
        target: A decoder (anything with ``embedding_dim``), a :class:`ModelInfo`, or a model folder / id.
        local_files_only: Never download (when ``target`` is a model id).
        rtol: Tolerance of the row comparison, relative to each anchor's norm.

    Raises:
        AnchorMismatchError: The width, the class names or the rows disagree.
        ModelNotFoundError: ``target`` is a model folder that is missing or incomplete.
        UnsupportedModelError: ``target`` is a model folder of an unsupported family.
    """
    if isinstance(target, (str, os.PathLike)):
        target = inspect_model(target, local_files_only=local_files_only)
    if isinstance(target, ModelInfo):
        if anchors.dim != target.embedding_dim:
            widths = " + ".join(map(str, target.token_widths))
            raise AnchorMismatchError(
                f"the anchors are {anchors.dim}-d but {target.source!r} ({target.pipeline_class}) takes "
                f"{target.embedding_dim}-d vectors ({widths}: its token tables' widths); build the anchors from "
                "this model with dreamood.decoding.backends.load_anchors and train Phase 1 on them"
            )
        ids = [i for row in anchors.token_ids for i in row]
        if ids and max(ids) >= min(target.vocab_sizes):
            raise AnchorMismatchError(
                f"the anchors hold token id {max(ids)}, outside the {min(target.vocab_sizes)}-row token table of "
                f"{target.source!r}; they come from another tokenizer"
            )
        return
    width = int(target.embedding_dim)
    if anchors.dim != width:
        raise AnchorMismatchError(
            f"the anchors are {anchors.dim}-d but the decoder {type(target).__name__} takes {width}-d vectors; "
            "build the anchors from the decoder's model (dreamood.decoding.backends.load_anchors)"
        )
    names = list(target.class_names)
    if names != anchors.class_names:
        raise AnchorMismatchError(
            f"the anchors' classes {anchors.class_names[:5]}{'...' if anchors.num_classes > 5 else ''} "
            f"({anchors.num_classes}) differ from the decoder's {names[:5]}{'...' if len(names) > 5 else ''} "
            f"({len(names)}); labels would decode with the wrong prompts"
        )
    tables = _decoder_tables(target)
    if tables is None or anchors.policy not in SUBWORD_POLICIES or not all(anchors.token_ids):
        return
    tokenizers, encoders = tables
    expected = TokenEmbeddings.from_text_encoders(
        tokenizers, encoders, anchors.class_names, anchors.policy, check_vocab=False
    ).vectors.double()
    got = anchors.vectors.detach().double().cpu()
    errors = (got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    worst = int(errors.argmax())
    if float(errors[worst]) > rtol:
        raise AnchorMismatchError(
            f"the anchor of class {anchors.class_names[worst]!r} is not that class's row of the decoder's token "
            f"table(s) (relative difference {float(errors[worst]):.3g} > {rtol:g}); the anchors come from another "
            "model. Build them from the decoder's model (dreamood.decoding.backends.load_anchors)"
        )
