"""Tiny, randomly initialised models for tests, smoke runs and examples that must run offline.

Nothing here downloads anything: the CLIP tokenizer is written from a small ``vocab.json``/``merges.txt``
built on the fly, and every network is randomly initialised from a seed. The models have the same
architecture families as Stable Diffusion v1.x (CLIP text encoder, conditional UNet, KL autoencoder),
so code paths are exercised exactly as with real weights, only smaller.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from dreamood.config import PipelineConfig
    from dreamood.pipeline import PipelineData

__all__ = [
    "TINY_FAMILIES",
    "TINY_WORDS",
    "smoke_setup",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_sd2_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_stable_diffusion_pipeline",
    "tiny_unet",
    "tiny_vae",
    "write_tiny_clip_tokenizer",
    "write_tiny_lora",
    "write_tiny_model",
]

#: Words that the tiny tokenizer knows as single tokens: the default prompt's words and a few class names.
TINY_WORDS: tuple[str, ...] = (
    "a", "high", "-", "quality", "photo", "of", "an", "image", "the",
    "cat", "dog", "car", "ship", "apple", "bird", "horse", "truck", "frog", "deer", "plane",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "digit",
)  # fmt: skip


# ---- smoke runs ---------------------------------------------------------------------------------------------

_SMOKE_CLASSES: dict[str, list[str]] = {
    "cifar100": ["apple", "bird", "cat", "dog"],
    "imagenet100": ["bird", "frog", "horse", "ship"],
    "folder": ["car", "deer", "plane", "truck"],
}


def smoke_setup(
    config: PipelineConfig,
    output_dir: str | os.PathLike[str],
    *,
    per_class: int = 24,
    image_size: int = 32,
    model_dir: str | os.PathLike[str] | None = None,
    backend: str = "sd1",
) -> tuple[PipelineConfig, PipelineData]:
    """Shrink ``config`` to a run that checks the whole wiring on a CPU in seconds, with random data.

    Every stage runs as in a real run, through the same code, but with a tiny randomly initialised Stable
    Diffusion (saved to ``model_dir`` and loaded back from there, like real weights), four classes of random
    images (one random prototype per class plus noise, pixels in ``[0, 1]``, normalised like the benchmark's
    images), two random OOD sets, a rotated copy of the ID test set as generalisation set, a small CNN, a few
    epochs and a few generated images per class. The OOD numbers it produces mean nothing; the classifier does
    learn the four classes. Run the baselines with :data:`SMOKE_BASELINES`.

    Args:
        config: The configuration to shrink (its benchmark, method and seed are kept).
        output_dir: Folder of the smoke run.
        per_class: Random training images per class.
        image_size: Side of the random images.
        model_dir: Folder of the tiny Stable Diffusion, written when it does not hold one yet; default
            ``output_dir/tiny-stable-diffusion``.
        backend: The model family of the tiny model written there: ``"sd1"`` (Stable Diffusion v1.x),
            ``"sd2"`` (v2.x: OpenCLIP tokenizer, v-prediction) or ``"sdxl"`` (two text encoders; generated with
            its own scheduler).

    Returns:
        The shrunk configuration and the random datasets.
    """
    from torch.utils.data import TensorDataset

    from dreamood._utils import library_progress_bars
    from dreamood.data.transforms import get_transform
    from dreamood.pipeline import PipelineData
    from dreamood.pipeline.data import normalization_of

    root = Path(output_dir).expanduser()
    model = root / "tiny-stable-diffusion" if model_dir is None else Path(model_dir).expanduser()
    if backend not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"backend must be 'sd1', 'sd2' or 'sdxl', got {backend!r}")
    if not (model / "model_index.json").is_file():
        with library_progress_bars(["transformers", "diffusers"], enabled=config.progress):
            if backend == "sd1":
                with tempfile.TemporaryDirectory() as scratch:
                    tiny_stable_diffusion_pipeline(scratch).save_pretrained(str(model))
                # Newer transformers save only tokenizer.json; SD v1.x folders also hold vocab.json and merges.txt.
                write_tiny_clip_tokenizer(model / "tokenizer")
            else:
                write_tiny_model(model, backend)
    names = _SMOKE_CLASSES[config.benchmark]
    keep = 1 if config.method == "dream-id" else 2
    small = config.replace(
        **{
            "output_dir": str(root),
            "device": "cpu",
            "data.class_names": names,
            "data.image_size": image_size,
            "data.num_workers": 0,
            "anchors.model": str(model),
            "encoder.backbone": "small",
            "encoder.epochs": 3,
            "encoder.batch_size": 16,
            "bank.per_class": 16,
            "bank.batch_size": 32,
            "sampler.k": 4,
            "sampler.boundary": 8,
            "sampler.anchors_per_round": 4,
            "sampler.candidates_per_anchor": 32,
            "sampler.keep": keep,
            "sampler.num_per_class": 8,
            "generation.model": str(model),
            "generation.steps": 2,
            "generation.height": 64,
            "generation.width": 64,
            "generation.save_size": image_size,
            "generation.images_per_class": 4,
            "generation.batch_size": 8,
            "generation.dtype": "fp32",
            **({"generation.scheduler": "model"} if backend == "sdxl" else {}),
            "training.backbone": "small",
            "training.epochs": 6,
            "training.batch_size": 16,
            "training.outlier_batch_size": 8,
            "training.init_checkpoint": None,
            "training.pretrain_epochs": min(config.training.pretrain_epochs, 1),
            "evaluation.repeats": 2,
            "evaluation.batch_size": 64,
        }
    )
    from dreamood.baselines import rotate_images

    generator = torch.Generator().manual_seed(config.seed)
    shape = (3, image_size, image_size)
    prototypes = torch.rand(len(names), *shape, generator=generator)
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in normalization_of(config.benchmark))

    def pixels(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(len(names)).repeat_interleave(count)
        noise = 0.2 * torch.randn(len(labels), *shape, generator=generator)
        return (prototypes[labels] + noise).clamp(0.0, 1.0), labels

    def normalized(images: Tensor, labels: Tensor | None = None) -> TensorDataset:
        images = (images - mean) / std  # as the benchmark's transforms normalise real images
        return TensorDataset(images) if labels is None else TensorDataset(images, labels)

    train_pixels, train_labels = pixels(per_class)
    test_pixels, test_labels = pixels(max(per_class // 2, 3))
    train = normalized(train_pixels, train_labels)
    ood: dict[str, Dataset[Any]] = {
        "Gaussian noise": normalized((0.5 + 0.25 * torch.randn(40, *shape, generator=generator)).clamp(0.0, 1.0)),
        "Uniform noise": normalized(torch.rand(40, *shape, generator=generator)),
    }
    rotated = rotate_images(test_pixels, 15.0, seed=config.seed)
    data = PipelineData(
        names,
        train,
        train,
        normalized(test_pixels, test_labels),
        ood,
        generated_transform=get_transform(config.benchmark, "generated", image_size=image_size),
        generalization={"ID test, rotated": normalized(rotated, test_labels)},
        raw_train=TensorDataset(train_pixels, train_labels),
    )
    return small, data


# ---- tiny models -------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of CLIP's (and GPT-2's) byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _apply_merges(pieces: list[str], merges: list[str]) -> list[str]:
    """Byte-pair-encode ``pieces`` with ``merges`` in rank order, as CLIP's tokenizer does."""
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [f"{a} {b}" for a, b in itertools.pairwise(pieces)]
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        first, second = best.split(" ")
        merged: list[str] = []
        index = 0
        while index < len(pieces):
            if index + 1 < len(pieces) and pieces[index] == first and pieces[index + 1] == second:
                merged.append(first + second)
                index += 2
            else:
                merged.append(pieces[index])
                index += 1
        pieces = merged
    return pieces


def write_tiny_clip_tokenizer(directory: str | os.PathLike[str], words: Sequence[str] = TINY_WORDS) -> Path:
    """Write a ``vocab.json`` and ``merges.txt`` for a CLIP BPE tokenizer that knows ``words`` whole.

    Every byte is in the vocabulary (alone and as an end-of-word piece), so any text can be tokenised;
    ``words`` get merges that turn each into a single token. Returns ``directory``.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    characters = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(piece, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        # Apply the merges so far as BPE would (lowest rank first); while the word is still split, add a
        # merge of its first two pieces. Merges added later rank lower, so earlier words stay whole.
        while len(pieces := _apply_merges([*word[:-1], word[-1] + "</w>"], merges)) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return target


def tiny_clip_tokenizer(
    directory: str | os.PathLike[str], words: Sequence[str] = TINY_WORDS, model_max_length: int = 77
) -> Any:
    """Write a tiny vocabulary to ``directory`` and load it as a ``transformers.CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(directory, words)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length, local_files_only=True)


def tiny_clip_text_encoder(
    vocab_size: int, *, hidden_size: int = 32, max_position_embeddings: int = 77, seed: int = 0
) -> Any:
    """A randomly initialised two-layer ``transformers.CLIPTextModel`` (eval mode, float32)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        projection_dim=hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    model: Any = CLIPTextModel(config)
    # A wider spread than the default init so that swapping one token embedding visibly changes the output.
    table: torch.nn.Embedding = model.get_input_embeddings()
    with torch.no_grad():
        table.weight.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(seed))
    model.eval()
    return model


def tiny_unet(*, cross_attention_dim: int = 32, seed: int = 0) -> Any:
    """A randomly initialised two-level ``diffusers.UNet2DConditionModel`` (4 latent channels, eval mode).

    Args:
        cross_attention_dim: Width of the text conditioning (the text encoder's hidden size).
        seed: Seed of the initial weights (the global RNG is left untouched).
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    unet.eval()
    return unet


def tiny_vae(*, seed: int = 0) -> Any:
    """A randomly initialised ``diffusers.AutoencoderKL`` with Stable Diffusion's 8x downsampling (eval mode).

    Args:
        seed: Seed of the initial weights (the global RNG is left untouched).
    """
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae: Any = AutoencoderKL(  # type: ignore[no-untyped-call]
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
    vae.eval()
    return vae


def tiny_stable_diffusion_pipeline(
    directory_or_tokenizer: str | os.PathLike[str] | Any,
    *,
    words: Sequence[str] = TINY_WORDS,
    model_max_length: int = 77,
    hidden_size: int = 32,
    seed: int = 0,
) -> Any:
    """A tiny, randomly initialised ``diffusers.StableDiffusionPipeline`` that runs offline on a CPU in seconds.

    Same components as Stable Diffusion v1.x (CLIP tokenizer and text encoder, conditional UNet, KL autoencoder
    with 8x downsampling, PNDM scheduler with SD's noise schedule), no safety checker. Use 32x32 or 64x64
    images and a few inference steps.

    Args:
        directory_or_tokenizer: A folder to write the tiny tokenizer to, or a ready CLIP tokenizer.
        words: Words the tokenizer knows as single tokens (when a folder is given).
        model_max_length: Tokenizer window (when a folder is given).
        hidden_size: Width of the text encoder's token embeddings and of the UNet's cross-attention.
        seed: Seed of all initial weights.

    Returns:
        The pipeline, on the CPU, in float32.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if isinstance(directory_or_tokenizer, (str, os.PathLike)):
        tokenizer = tiny_clip_tokenizer(directory_or_tokenizer, words, model_max_length=model_max_length)
    else:
        tokenizer = directory_or_tokenizer
    text_encoder = tiny_clip_text_encoder(
        len(tokenizer),
        hidden_size=hidden_size,
        max_position_embeddings=int(tokenizer.model_max_length),
        seed=seed,
    )
    scheduler = PNDMScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=tiny_vae(seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(cross_attention_dim=hidden_size, seed=seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_text_config(tokenizer: Any, hidden_size: int, *, legacy_eos: bool, projection_dim: int | None = None) -> Any:
    """A two-layer ``CLIPTextConfig`` for ``tokenizer``; ``legacy_eos`` pools at the largest id like SD 2.x's."""
    from transformers import CLIPTextConfig

    vocab = len(tokenizer)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=int(tokenizer.model_max_length),
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
        # OpenCLIP conversions keep the old ids 0/2/1; transformers then pools at the argmax of the ids.
        bos_token_id=0 if legacy_eos else vocab - 2,
        eos_token_id=2 if legacy_eos else vocab - 1,
        pad_token_id=1 if legacy_eos else vocab - 1,
    )


def _spread_table(model: Any, seed: int) -> Any:
    table: torch.nn.Embedding = model.get_input_embeddings()
    with torch.no_grad():
        table.weight.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(seed))
    model.eval()
    return model


def _sd_noise_schedule() -> dict[str, Any]:
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def tiny_sd2_pipeline(
    directory: str | os.PathLike[str],
    *,
    hidden_size: int = 48,
    prediction_type: str = "v_prediction",
    seed: int = 0,
) -> Any:
    """A tiny, random ``StableDiffusionPipeline`` shaped like Stable Diffusion 2.x (CPU, float32).

    What differs from :func:`tiny_stable_diffusion_pipeline` is what differs between SD 1.x and 2.x: a text
    encoder of another width (1024 in SD 2.x; ``hidden_size`` here) with GELU and OpenCLIP's legacy token ids
    (pooling at the largest id), a tokenizer whose padding token is ``"!"`` as in SD 2.x's, a UNet with linear
    attention projections and per-block head counts, and a DDIM scheduler with ``prediction_type``
    (``"v_prediction"`` for SD 2.x at 768 px, ``"epsilon"`` for SD 2.x-base and SD-Turbo).

    Args:
        directory: Folder to write the tiny tokenizer to.
        hidden_size: Width of the token embeddings and of the UNet's cross-attention.
        prediction_type: ``"v_prediction"`` or ``"epsilon"``.
        seed: Seed of all initial weights.

    Returns:
        The pipeline.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    write_tiny_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=77, pad_token="!", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _spread_table(CLIPTextModel(_tiny_text_config(tokenizer, hidden_size, legacy_eos=True)), seed)
        unet: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden_size,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
        )
        unet.eval()
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]
        **_sd_noise_schedule(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=tiny_vae(seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(
    directory: str | os.PathLike[str],
    *,
    hidden_sizes: tuple[int, int] = (32, 48),
    projection_dim: int = 16,
    seed: int = 0,
) -> Any:
    """A tiny, random ``StableDiffusionXLPipeline`` (CPU, float32, no watermark).

    The components of Stable Diffusion XL, small: ``tokenizer`` and ``tokenizer_2`` (the same tiny vocabulary;
    the second pads with ``"!"`` as SDXL's does), ``text_encoder`` (``CLIPTextModel``, width ``hidden_sizes[0]``;
    768 in SDXL) and ``text_encoder_2`` (``CLIPTextModelWithProjection``, width ``hidden_sizes[1]``, 1280 in SDXL,
    with OpenCLIP's legacy token ids), a UNet with the ``"text_time"`` addition embedding reading the pooled
    projection and six size/crop ids, the KL autoencoder, and an Euler scheduler with SDXL's noise schedule.

    Args:
        directory: Folder to write the tiny tokenizer to.
        hidden_sizes: Widths of the two text encoders' token embeddings.
        projection_dim: Width of the pooled embedding of the second encoder.
        seed: Seed of all initial weights.

    Returns:
        The pipeline.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=77, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=77, pad_token="!", local_files_only=True
    )
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _spread_table(
            CLIPTextModel(_tiny_text_config(tokenizer, hidden_sizes[0], legacy_eos=False)), seed
        )
        text_encoder_2 = _spread_table(
            CLIPTextModelWithProjection(
                _tiny_text_config(tokenizer_2, hidden_sizes[1], legacy_eos=True, projection_dim=projection_dim)
            ),
            seed + 1,
        )
        unet: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=sum(hidden_sizes),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
            norm_num_groups=8,
        )
        unet.eval()
    scheduler = EulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        **_sd_noise_schedule(), steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=tiny_vae(seed=seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def write_tiny_lora(
    pipeline: Any,
    directory: str | os.PathLike[str],
    *,
    rank: int = 2,
    alpha: int = 2,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    seed: int = 0,
) -> Path:
    """Write a random LoRA for ``pipeline``'s UNet in diffusers' format (``pytorch_lora_weights.safetensors``).

    Both LoRA matrices are random (not the usual zero ``B``), so loading it changes the images. The pipeline is
    left untouched (the LoRA is made on a copy of its UNet). Needs ``peft``.

    Args:
        pipeline: A Stable Diffusion or Stable Diffusion XL pipeline.
        directory: Folder to write to.
        rank: LoRA rank.
        alpha: LoRA alpha (the update is ``alpha / rank * B A``).
        target_modules: UNet attention projections the LoRA adapts.
        seed: Seed of the LoRA matrices.

    Returns:
        ``directory``.
    """
    import copy

    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipeline.unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))  # type: ignore[no-untyped-call]
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    type(pipeline).save_lora_weights(str(target), unet_lora_layers=layers, safe_serialization=True)
    return target


#: Model families :func:`write_tiny_model` can write.
TINY_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")


def write_tiny_model(directory: str | os.PathLike[str], family: str = "sd1", *, seed: int = 0) -> Path:
    """Save a tiny random model folder of ``family`` as real weights are laid out (``model_index.json`` and parts).

    ``"sd1"`` is :func:`tiny_stable_diffusion_pipeline`, ``"sd2"`` :func:`tiny_sd2_pipeline`, ``"sdxl"``
    :func:`tiny_sdxl_pipeline`. Each tokenizer folder also gets the original CLIP files ``vocab.json`` and
    ``merges.txt``. Load it back with :func:`dreamood.decoding.backends.load_decoder` and
    :func:`~dreamood.decoding.backends.load_anchors`.

    Args:
        directory: Folder to write (created).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        seed: Seed of the random weights.

    Returns:
        ``directory``.

    Raises:
        ValueError: ``family`` is unknown.
    """
    import tempfile

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, TINY_FAMILIES))}, got {family!r}")
    target = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        if family == "sd1":
            pipeline = tiny_stable_diffusion_pipeline(scratch, seed=seed)
        elif family == "sd2":
            pipeline = tiny_sd2_pipeline(scratch, seed=seed)
        else:
            pipeline = tiny_sdxl_pipeline(scratch, seed=seed)
        pipeline.save_pretrained(str(target))
    for folder in ("tokenizer", "tokenizer_2"):
        if (target / folder).is_dir():
            write_tiny_clip_tokenizer(target / folder)
    return target
