"""Images per second of Stable Diffusion outlier generation: dreamood's decoder and its speed levers.

Workload (the paper's): 512x512 images, 50 PLMS steps, classifier-free guidance 7.5, half precision. Each row
is one configuration, built fresh, warmed up (a batch with ``--warmup-steps`` denoising steps, which also
compiles; excluded from timing) and timed over ``--timed-batches`` batches with ``torch.cuda.synchronize``
around the timer. Rows:

* ``plain``: the baseline, a plain diffusers ``StableDiffusionPipeline`` call on a batch of prompts (PIL out).
* ``decoder``, ``channels_last``, ``fused_qkv``, ``compile_unet``, ``compile_vae``: a ladder, each row adding
  one lever to the previous one: ``StableDiffusionDecoder.decode`` with SDPA attention (injection of the class
  token embeddings, per-image seeds, images quantised to 8 bits and copied to the CPU), then channels-last,
  fused QKV projections, ``torch.compile`` of the UNet, ``torch.compile`` of the VAE decoder. The last rung
  is the *fast* configuration the remaining rows start from.
* ``max_autotune``, ``cudagraphs``: the fast configuration compiled with mode ``max-autotune-no-cudagraphs``
  or ``reduce-overhead`` (CUDA graphs) instead of the default mode.
* ``bf16``: the fast configuration in bfloat16. ``batch_<n>``: the fast configuration with batch size ``n``.
* ``generate_images``: the fast configuration through :func:`dreamood.decoding.generate_images` (planning,
  seeds, quantisation on the GPU, PNG encoding with the record chunk and atomic writes in ``--writer-threads``
  threads while the GPU renders the next batch), the library's end-to-end path.
* ``generate_images_inline``: the same with ``writer_threads=0`` (PNG files written between batches, in the
  calling thread): what the writer threads save.
* ``png_encode``: PNG encoding alone on one CPU thread, the cost ``generate_images`` adds per image.
* ``vae_decode_<n>``: the VAE decoder alone (channels-last, fused QKV, eager) on batches of ``n`` latents.
* ``dpm_solver``: the fast configuration with DPM-Solver++ and ``--dpm-steps`` steps. LESS WORK than the
  other rows (fewer UNet evaluations); not comparable as a speed-up of the same computation.
* ``lcm_lora``: the fast configuration with an LCM-LoRA fused into the UNet (``--lcm-lora``, else a random LoRA
  of the same architecture: fused, its rank costs nothing), the LCM scheduler, ``--lcm-steps`` steps and no
  guidance. LESS WORK (4 UNet evaluations per image instead of 100).
* ``turbo``: the fast configuration with Euler and "trailing" timesteps (the scheduler SD-Turbo and SDXL-Turbo
  ship), ``--turbo-steps`` steps, no guidance: the work of a Turbo model. LESS WORK. Without ``--model`` the UNet is
  SD v1.4's; SD-Turbo's (the SD 2.1 UNet) costs about the same per step.
* ``plain_fp32``: the plain pipeline in float32 on ``--check-images`` images, the yardstick of half-precision
  tolerance for the image comparisons.

Image checks of the LESS WORK rows: their images cannot agree with the 50-step ones (another sampler, another
image), so each is compared with the plain diffusers pipeline run *with the same setting* (scheduler, LoRA, steps,
guidance) on the same prompts and seeds (``agreement_with_plain_same_setting``: the decoder's exactness under
that setting), and ``image_stats`` records the pixel standard deviation and the fraction of saturated pixels, which
flag black, flat or blown-out images.

Image agreement: every row that renders the first ``--check-images`` images (same prompts, token embeddings
and seeds as the ``plain`` row) is compared with the plain pipeline's images as 8-bit pixels: max and mean
absolute difference (in [0, 1] units) and PSNR. Decoding a class's own token embedding reproduces the plain
prompt's image, so differences come only from numerics.

Without ``--model`` the pipeline is a randomly initialised one of the exact Stable Diffusion v1.4 architecture
(``benchmarks/sd14_architecture.py``): the same arithmetic, meaningless images. The JSON file is rewritten
after every row, so a killed run keeps what it measured. Run::

    python benchmarks/bench_generation.py --out benchmarks/results/generation_h200.json
    python benchmarks/bench_generation.py --tiny --out /tmp/generation_tiny.json   # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's dreamood, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd14_architecture import load_pipeline, sd14_pipeline, tiny_pipeline

from dreamood.io import atomic_write

CLASS_NAMES = ("cat", "dog", "car", "ship", "apple", "bird", "horse", "truck", "frog", "deer", "plane")
PROMPT_TEMPLATE = "A high-quality photo of a {}"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Setup:
    """One configuration to measure."""

    kind: str  # plain | decode | generate | png | vae
    description: str
    dtype: str = "fp16"
    channels_last: bool = False
    fused_qkv: bool = False
    compile_unet: bool = False
    compile_vae: bool = False
    compile_mode: str = "default"
    batch_size: int = 64
    scheduler: str = "pndm"
    steps: int = 50
    less_work: bool = False
    writer_threads: int = 0
    guidance_scale: float | None = None  # None: --guidance-scale
    lora: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local Stable Diffusion v1.x folder (default: random v1.4)")
    parser.add_argument("--rows", nargs="+", default=None, help="rows to run, in this order (default: all)")
    parser.add_argument("--list-rows", action="store_true", help="print the row names and exit")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 (fp32 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default 512)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="batch_<n> rows (default 32 128)")
    parser.add_argument("--vae-batch-sizes", type=int, nargs="*", default=None, help="default 8 16 32 64")
    parser.add_argument("--timed-batches", type=int, default=None, help="timed batches per row (default 2)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up batch (default 3)")
    parser.add_argument("--dpm-steps", type=int, default=None, help="steps of the dpm_solver row (default 25)")
    parser.add_argument("--lcm-steps", type=int, default=None, help="steps of the lcm_lora row (default 4)")
    parser.add_argument("--turbo-steps", type=int, default=None, help="steps of the turbo row (default 1)")
    parser.add_argument("--lcm-lora", default=None, help="LCM-LoRA folder (default: a random LoRA, same cost)")
    parser.add_argument("--output-size", type=int, default=None, help="size images are saved at (default: --size)")
    parser.add_argument("--check-images", type=int, default=None, help="images compared with plain (default 16)")
    parser.add_argument("--writer-threads", type=int, default=4, help="PNG writer threads of generate_images")
    parser.add_argument("--compile-backend", default=None, help="default inductor (eager with --tiny)")
    parser.add_argument("--work-dir", default=None, help="folder for written images (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the random weights")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the results to this JSON file (after every row)")
    args = parser.parse_args(argv)
    full = {
        "device": "cuda",
        "dtype": "fp16",
        "size": 512,
        "steps": 50,
        "batch_size": 64,
        "batch_sizes": [32, 128],
        "vae_batch_sizes": [8, 16, 32, 64],
        "timed_batches": 2,
        "warmup_steps": 3,
        "dpm_steps": 25,
        "lcm_steps": 4,
        "turbo_steps": 1,
        "check_images": 16,
        "compile_backend": "inductor",
    }
    tiny = {
        "device": "cpu",
        "dtype": "fp32",
        "size": 32,
        "steps": 2,
        "batch_size": 2,
        "batch_sizes": [3],
        "vae_batch_sizes": [1, 2],
        "timed_batches": 1,
        "warmup_steps": 1,
        "dpm_steps": 2,
        "lcm_steps": 2,
        "turbo_steps": 1,
        "check_images": 2,
        "compile_backend": "eager",
    }
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and args.model:
        parser.error("--tiny builds its own tiny models; drop --model")
    positive = ("size", "steps", "batch_size", "timed_batches", "warmup_steps", "dpm_steps", "lcm_steps", "turbo_steps")
    for name in (*positive, "check_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.size % 8:
        parser.error(f"--size must be a multiple of 8, got {args.size}")
    args.check_images = min(args.check_images, args.batch_size)
    known = setups(args)
    if args.list_rows:
        print("\n".join(f"{name:<18} {setup.description}" for name, setup in known.items()))
        parser.exit()
    args.rows = list(known) if args.rows is None else args.rows
    unknown = [row for row in args.rows if row not in known]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(known)}")
    return args


def setups(args: argparse.Namespace) -> dict[str, Setup]:
    """Every row this run can measure, by name, in the default order."""
    base = Setup("decode", "", dtype=args.dtype, batch_size=args.batch_size, steps=args.steps)
    ladder: list[tuple[str, str, dict[str, Any]]] = [
        ("decoder", "StableDiffusionDecoder.decode, SDPA attention, eager", {}),
        ("channels_last", "+ channels-last UNet and VAE", {"channels_last": True}),
        ("fused_qkv", "+ fused QKV projections", {"fused_qkv": True}),
        ("compile_unet", "+ torch.compile UNet (mode default)", {"compile_unet": True}),
        ("compile_vae", "+ torch.compile VAE decoder = the fast configuration", {"compile_vae": True}),
    ]
    rows: dict[str, Setup] = {
        "plain": replace(base, kind="plain", description="plain diffusers StableDiffusionPipeline call (baseline)")
    }
    current = base
    for name, description, change in ladder:
        current = replace(current, description=description, **change)
        rows[name] = current
    fast = current
    rows["max_autotune"] = replace(
        fast, description="fast, compile max-autotune-no-cudagraphs", compile_mode="max-autotune-no-cudagraphs"
    )
    rows["cudagraphs"] = replace(
        fast, description="fast, compile reduce-overhead (CUDA graphs)", compile_mode="reduce-overhead"
    )
    rows["bf16"] = replace(fast, description="fast in bfloat16", dtype="bf16")
    for size in args.batch_sizes:
        rows[f"batch_{size}"] = replace(fast, description=f"fast, batch size {size}", batch_size=size)
    rows["generate_images"] = replace(
        fast,
        kind="generate",
        writer_threads=args.writer_threads,
        description=f"fast through generate_images, PNGs written in {args.writer_threads} threads",
    )
    rows["generate_images_inline"] = replace(
        fast, kind="generate", description="fast through generate_images, PNGs written inline (writer_threads=0)"
    )
    rows["png_encode"] = replace(fast, kind="png", description="PNG encoding alone, 1 CPU thread")
    for size in args.vae_batch_sizes:
        rows[f"vae_decode_{size}"] = replace(
            fast,
            kind="vae",
            description=f"VAE decode alone, batch {size} (eager, channels-last, fused QKV)",
            batch_size=size,
            compile_unet=False,
            compile_vae=False,
        )
    rows["dpm_solver"] = replace(
        fast,
        description=f"fast, DPM-Solver++ {args.dpm_steps} steps -- LESS WORK",
        scheduler="dpm++",
        steps=args.dpm_steps,
        less_work=True,
    )
    rows["lcm_lora"] = replace(
        fast,
        description=f"fast, LCM-LoRA fused, LCM scheduler, {args.lcm_steps} steps, no guidance -- LESS WORK",
        scheduler="lcm",
        steps=args.lcm_steps,
        guidance_scale=1.0,
        lora=True,
        less_work=True,
    )
    rows["turbo"] = replace(
        fast,
        description=f"fast, Euler trailing (Turbo), {args.turbo_steps} step(s), no guidance -- LESS WORK",
        scheduler="turbo",
        steps=args.turbo_steps,
        guidance_scale=0.0,
        less_work=True,
    )
    rows["plain_fp32"] = Setup(
        "plain",
        f"plain pipeline in float32, {args.check_images} images (tolerance yardstick)",
        dtype="fp32",
        batch_size=args.check_images,
        steps=args.steps,
    )
    return rows


# ---- helpers ------------------------------------------------------------------------------------------------


def quiet_logs() -> None:
    """Keep compilation and library chatter off stdout: errors only (autotuning prints a line per kernel)."""
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR, aot=logging.ERROR)
    with contextlib.suppress(ImportError, AttributeError):
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "autotune_num_choices_displayed"):
            inductor_config.autotune_num_choices_displayed = 0
        from torch._inductor import select_algorithm

        select_algorithm.PRINT_AUTOTUNE = False
    for library in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            module = __import__(f"{library}.utils", fromlist=["logging"])
            module.logging.set_verbosity_error()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._(dynamo|inductor)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Wall time of the block, with the device's queued work finished on both sides."""
    elapsed: list[float] = []
    synchronize(device)
    start = time.perf_counter()
    yield elapsed
    synchronize(device)
    elapsed.append(time.perf_counter() - start)


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` float images as 8-bit pixels, rounded as diffusers' and dreamood's PNG writers round them."""
    return (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def agreement(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """Max and mean absolute difference (in [0, 1] units) and PSNR (dB, peak 1) of two 8-bit image sets."""
    count = min(len(images), len(reference))
    difference = (images[:count].double() - reference[:count].double()).abs() / 255.0
    mse = float(difference.square().mean())
    return {
        "images": count,
        "max_abs": float(difference.max()),
        "mean_abs": float(difference.mean()),
        "psnr_db": None if mse == 0.0 else 10.0 * math.log10(1.0 / mse),
    }


def image_plan(args: argparse.Namespace, count: int) -> tuple[list[int], list[int]]:
    """Labels and seeds of images ``0 .. count-1`` (the same for every row)."""
    from dreamood.decoding.generation import image_seed

    labels = [index % len(CLASS_NAMES) for index in range(count)]
    return labels, [image_seed(args.seed, index) for index in range(count)]


# ---- building -------------------------------------------------------------------------------------------------


def build_pipeline(args: argparse.Namespace, dtype: str) -> Any:
    """A fresh plain pipeline: the model folder, the random v1.4 architecture, or the tiny test models."""
    device, torch_dtype = torch.device(args.device), DTYPES[dtype]
    if args.model:
        pipeline = load_pipeline(args.model, device=device, dtype=torch_dtype)
    elif args.tiny:
        pipeline = tiny_pipeline(args.tokenizer_dir, device=device, dtype=torch_dtype, seed=args.seed)
    else:
        pipeline = sd14_pipeline(args.tokenizer_dir, device=device, dtype=torch_dtype, seed=args.seed)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_decoder(args: argparse.Namespace, setup: Setup) -> tuple[Any, torch.Tensor]:
    """The decoder of a setup with its levers switched on, and the class anchors T(y) (float32, on the device)."""
    from diffusers import EulerDiscreteScheduler

    from dreamood.anchors import TokenEmbeddings
    from dreamood.decoding.few_step import apply_lora, make_scheduler
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    pipeline = build_pipeline(args, setup.dtype)
    if setup.lora:
        apply_lora(pipeline, lora_folder(args, pipeline))
    if setup.scheduler == "turbo":
        pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    elif setup.scheduler != "pndm":
        pipeline.scheduler = make_scheduler(setup.scheduler, pipeline.scheduler)
    decoder = StableDiffusionDecoder(
        pipeline,
        CLASS_NAMES,
        prompt_template=PROMPT_TEMPLATE,
        num_inference_steps=setup.steps,
        guidance_scale=guidance(args, setup),
        height=args.size,
        width=args.size,
        output_size=args.output_size,
        batch_size=setup.batch_size,
        progress=False,
    )
    decoder.enable_speedups(
        sdpa=True,
        channels_last=setup.channels_last,
        fuse_qkv_projections=setup.fused_qkv,
        compile=setup.compile_unet,
        compile_vae=setup.compile_vae,
        compile_mode=setup.compile_mode,
        compile_backend=args.compile_backend,
    )
    anchors = TokenEmbeddings.from_text_encoder(
        pipeline.tokenizer, pipeline.text_encoder, CLASS_NAMES, check_vocab=False, device=args.device
    )
    return decoder, anchors.vectors.float()


def guidance(args: argparse.Namespace, setup: Setup) -> float:
    return args.guidance_scale if setup.guidance_scale is None else setup.guidance_scale


def lora_folder(args: argparse.Namespace, pipeline: Any) -> str:
    """``--lcm-lora``, or a random LoRA of the pipeline's UNet written once (fused, it costs what LCM's costs)."""
    if args.lcm_lora:
        return str(args.lcm_lora)
    from dreamood.testing import write_tiny_lora

    folder = Path(args.work_dir) / "random-lora"
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        write_tiny_lora(pipeline, folder, rank=8, alpha=1, seed=args.seed)
    return str(folder)


def image_stats(pixels: torch.Tensor) -> dict[str, float]:
    """Pixel standard deviation (in [0, 1] units) and saturated fraction of 8-bit images: black or flat images show."""
    values = pixels.double() / 255.0
    return {
        "pixel_std": float(values.std()),
        "saturated_pixel_fraction": float(((pixels == 0) | (pixels == 255)).double().mean()),
    }


def plain_same_setting(args: argparse.Namespace, setup: Setup, run: DecoderRun, count: int) -> torch.Tensor:
    """The plain pipeline call (prompt text, no injection) with the row's setting on its first ``count`` images."""
    pipeline = run.decoder.pipeline
    prompts = [PROMPT_TEMPLATE.format(CLASS_NAMES[int(label)]) for label in run.labels[:count]]
    images = pipeline(
        prompt=prompts,
        num_inference_steps=setup.steps,
        guidance_scale=guidance(args, setup),
        height=args.size,
        width=args.size,
        generator=[torch.Generator().manual_seed(seed) for seed in run.seeds[:count]],
        output_type="pt",
    ).images.float()
    if args.output_size is not None and images.shape[-1] != args.output_size:
        import torch.nn.functional as F

        images = F.interpolate(images, size=args.output_size, mode="bilinear", antialias=True).clamp(0.0, 1.0)
    return to_uint8(images).cpu()


# ---- measurements ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    images: int
    batch_seconds: list[float]  # wall time of each timed batch (one entry when timed as a whole)
    warmup_seconds: float
    check: torch.Tensor | None = None  # the first check images as 8-bit pixels, on the CPU
    extra: dict[str, Any] | None = None


def measure_plain(args: argparse.Namespace, setup: Setup, device: torch.device) -> Measurement:
    import numpy as np

    pipeline = build_pipeline(args, setup.dtype)
    batches = 1 if setup.dtype == "fp32" else args.timed_batches
    labels, seeds = image_plan(args, batches * setup.batch_size)
    prompts = [PROMPT_TEMPLATE.format(CLASS_NAMES[label]) for label in labels]

    def call(start: int, steps: int) -> list[Any]:
        part = slice(start, start + setup.batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[part]]
        output = pipeline(
            prompt=prompts[part],
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            height=args.size,
            width=args.size,
            generator=generators,
        )
        return list(output.images)

    with stopwatch(device) as warmup:
        call(0, args.warmup_steps)
    seconds: list[float] = []
    first: list[Any] = []
    for batch in range(batches):
        with stopwatch(device) as timed:
            images = call(batch * setup.batch_size, setup.steps)
        seconds += timed
        first = first or images[: args.check_images]
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in first])
    saturated = ((pixels == 0) | (pixels == 255)).double().mean()
    return Measurement(
        images=batches * setup.batch_size,
        batch_seconds=seconds,
        warmup_seconds=warmup[0],
        check=pixels,
        extra={"saturated_pixel_fraction": float(saturated)},
    )


@dataclass
class DecoderRun:
    """A warmed-up decoder with its levers on, and the token embeddings, labels and seeds of the timed images."""

    decoder: Any
    vectors: torch.Tensor
    labels: torch.Tensor
    seeds: list[int]
    warmup_seconds: float

    def decode(self, part: slice) -> torch.Tensor:
        """8-bit images of ``part`` of the timed images, on the CPU."""
        return to_uint8(self.decoder.decode(self.vectors[part], self.labels[part], self.seeds[part])).cpu()


def prepare_decoder(args: argparse.Namespace, setup: Setup) -> DecoderRun:
    """Build the setup's decoder and decode one warm-up batch with few steps (compiling on the way).

    With CUDA graphs (``reduce-overhead``) the warm-up batch runs twice, so the graphs are recorded before timing.
    """
    device = torch.device(args.device)
    decoder, anchors = build_decoder(args, setup)
    labels, seeds = image_plan(args, args.timed_batches * setup.batch_size)
    label_tensor = torch.tensor(labels)
    calls = 2 if setup.compile_mode == "reduce-overhead" else 1
    steps, decoder.num_inference_steps = decoder.num_inference_steps, args.warmup_steps
    batch = label_tensor[: setup.batch_size]
    try:
        with stopwatch(device) as warmup:
            for _ in range(calls):
                decoder.decode(anchors[batch.to(anchors.device)], batch, list(range(setup.batch_size)))
    finally:
        decoder.num_inference_steps = steps
    return DecoderRun(decoder, anchors[label_tensor.to(anchors.device)], label_tensor, seeds, warmup[0])


def measure_decode(args: argparse.Namespace, setup: Setup, device: torch.device) -> Measurement:
    run = prepare_decoder(args, setup)
    seconds: list[float] = []
    first: torch.Tensor | None = None
    for start in range(0, len(run.seeds), setup.batch_size):
        with stopwatch(device) as timed:
            pixels = run.decode(slice(start, start + setup.batch_size))
        seconds += timed
        first = pixels[: args.check_images].clone() if first is None else first
    extra = None
    if setup.less_work and first is not None:
        reference = plain_same_setting(args, setup, run, len(first))
        extra = {"agreement_with_plain_same_setting": agreement(first, reference), "image_stats": image_stats(first)}
    return Measurement(len(run.seeds), seconds, run.warmup_seconds, check=first, extra=extra)


def measure_generate(args: argparse.Namespace, setup: Setup, device: torch.device, name: str) -> Measurement:
    from dreamood.decoding.generation import generate_images
    from dreamood.sampling.samples import EmbeddingSamples

    run = prepare_decoder(args, setup)
    samples = EmbeddingSamples(run.vectors, run.labels)
    folder = Path(args.work_dir) / name
    shutil.rmtree(folder, ignore_errors=True)
    with stopwatch(device) as timed:
        result = generate_images(
            run.decoder,
            samples,
            folder,
            batch_size=setup.batch_size,
            seed=args.seed,
            show_progress=False,
            writer_threads=setup.writer_threads,
        )
    files = list(folder.glob("*/*.png"))
    megabytes = sum(path.stat().st_size for path in files) / 2**20
    shutil.rmtree(folder, ignore_errors=True)
    count = len(run.seeds)
    if result.generated != count or len(files) != count:
        raise RuntimeError(f"generate_images wrote {len(files)} files ({result.generated} reported), expected {count}")
    return Measurement(count, timed, run.warmup_seconds, extra={"megabytes_written": round(megabytes, 2)})


def _encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of one ``(3, H, W)`` 8-bit image, with the settings of ``generate_images``."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def measure_png(args: argparse.Namespace, setup: Setup, images: torch.Tensor | None) -> Measurement:
    if images is None:
        raise RuntimeError("png_encode encodes the images of an earlier row; run plain or a decoder row before it")
    if args.output_size is not None and images.shape[-1] != args.output_size:
        import torch.nn.functional as F

        resized = F.interpolate(images.float() / 255.0, size=args.output_size, mode="bilinear", antialias=True)
        images = to_uint8(resized)
    _encode_png(images[0])
    start = time.perf_counter()
    sizes = [len(_encode_png(image)) for image in images]
    seconds = time.perf_counter() - start
    extra = {"image_size": int(images.shape[-1]), "mean_kilobytes": round(sum(sizes) / len(sizes) / 1024, 1)}
    return Measurement(len(images), [seconds], 0.0, extra=extra)


def measure_vae(args: argparse.Namespace, setup: Setup, device: torch.device) -> Measurement:
    pipeline = build_pipeline(args, setup.dtype)
    if setup.fused_qkv:
        pipeline.fuse_qkv_projections()
    if setup.channels_last:
        pipeline.vae.to(memory_format=torch.channels_last)
    vae = pipeline.vae
    scale = int(pipeline.vae_scale_factor)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (setup.batch_size, int(vae.config.latent_channels), args.size // scale, args.size // scale)
    latents = torch.randn(shape, generator=generator).to(device, DTYPES[setup.dtype])
    seconds: list[float] = []
    with torch.no_grad():
        with stopwatch(device) as warmup:
            vae.decode(latents / vae.config.scaling_factor, return_dict=False)
        for _ in range(args.timed_batches):
            with stopwatch(device) as timed:
                vae.decode(latents / vae.config.scaling_factor, return_dict=False)
            seconds += timed
    return Measurement(args.timed_batches * setup.batch_size, seconds, warmup[0])


# ---- the run --------------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "weights": args.model or ("tiny random test models" if args.tiny else "random, exact SD v1.4 architecture"),
    }
    for library in ("diffusers", "transformers", "PIL"):
        with contextlib.suppress(ImportError):
            info[library] = __import__(library).__version__
    return info


def run_row(
    name: str, setup: Setup, args: argparse.Namespace, device: torch.device, previous_images: torch.Tensor | None
) -> tuple[dict[str, Any], Measurement]:
    measurers: dict[str, Callable[[], Measurement]] = {
        "plain": lambda: measure_plain(args, setup, device),
        "decode": lambda: measure_decode(args, setup, device),
        "generate": lambda: measure_generate(args, setup, device, name),
        "png": lambda: measure_png(args, setup, previous_images),
        "vae": lambda: measure_vae(args, setup, device),
    }
    free_memory(device)
    measurement = measurers[setup.kind]()
    seconds = sum(measurement.batch_seconds)
    row: dict[str, Any] = {
        "name": name,
        **asdict(setup),
        "images": measurement.images,
        "seconds": seconds,
        "batch_seconds": measurement.batch_seconds,
        "images_per_s": measurement.images / seconds,
        "seconds_per_image": seconds / measurement.images,
        "warmup_seconds": measurement.warmup_seconds,
        **(measurement.extra or {}),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row, measurement


def summarise(rows: list[dict[str, Any]], target_images_per_s: float, target_ratio: float) -> dict[str, Any]:
    done = {row["name"]: row for row in rows if "images_per_s" in row}
    plain = done.get("plain", {}).get("images_per_s")
    full_work = [row for row in done.values() if row["kind"] in ("decode", "generate") and not row["less_work"]]
    best = max(full_work, key=lambda row: row["images_per_s"], default=None)
    end_to_end = done.get("generate_images", {}).get("images_per_s")
    summary: dict[str, Any] = {
        "plain_images_per_s": plain,
        "best_full_work_row": None if best is None else best["name"],
        "best_full_work_images_per_s": None if best is None else best["images_per_s"],
        "generate_images_per_s": end_to_end,
        "target_images_per_s": target_images_per_s,
        "target_ratio_to_plain": target_ratio,
    }
    if end_to_end is not None and plain:
        summary["generate_images_ratio_to_plain"] = end_to_end / plain
        meets = end_to_end >= target_images_per_s and end_to_end >= target_ratio * plain
        summary["generate_images_meets_targets"] = meets
    fast = done.get("compile_vae", {}).get("images_per_s")
    if end_to_end is not None and fast:
        summary["writing_overhead_fraction"] = 1.0 - end_to_end / fast
    inline = done.get("generate_images_inline", {}).get("images_per_s")
    if end_to_end is not None and inline:
        summary["writer_threads_speedup"] = end_to_end / inline
    return summary


def print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['name']:<18} FAILED: {row['error']}", flush=True)
        return
    ratio = row.get("ratio_to_plain")
    cells = [f"{row['images_per_s']:>9.3f}", f"{row['seconds_per_image'] * 1e3:>9.1f}"]
    cells.append(f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
    check = row.get("agreement_with_plain")
    if check is None:
        cells += [" " * 9, " " * 9, " " * 7]
    else:
        psnr = "same" if check["psnr_db"] is None else f"{check['psnr_db']:.1f}"
        cells += [f"{check['max_abs']:>9.4f}", f"{check['mean_abs']:>9.5f}", f"{psnr:>7}"]
    cells.append(f"{row['warmup_seconds']:>8.1f}")
    print(f"{row['name']:<18} {' '.join(cells)}  {row['description']}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected rows, print a table and write JSON after every row; return the results."""
    args = parse_args(argv)
    quiet_logs()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cleanup: list[str] = []
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="bench_generation_")
        cleanup.append(args.work_dir)
    args.tokenizer_dir = tempfile.mkdtemp(prefix="bench_tokenizer_")
    cleanup.append(args.tokenizer_dir)
    known = setups(args)
    results: dict[str, Any] = {
        "benchmark": "stable_diffusion_generation",
        "config": {key: value for key, value in vars(args).items() if key not in ("out", "tokenizer_dir")},
        "environment": environment(args),
        "rows": [],
        "summary": {},
    }
    target_images_per_s, target_ratio = 7.0, 2.0

    def save() -> None:
        results["summary"] = summarise(results["rows"], target_images_per_s, target_ratio)
        if args.out:
            with atomic_write(args.out, "w") as handle:
                json.dump(results, handle, indent=2)

    print(
        f"{args.size}x{args.size}, {args.steps} steps, guidance {args.guidance_scale}, {args.dtype}, batch "
        f"{args.batch_size}, {args.timed_batches} timed batches; {results['environment']['device_name']}; weights: "
        f"{results['environment']['weights']}"
    )
    header = (
        f"{'row':<18} {'images/s':>9} {'ms/image':>9} {'vs plain':>8} {'max|d|':>9} {'mean|d|':>9} {'PSNR':>7} "
        f"{'warm-up':>8}  description"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    plain_rate: float | None = None
    plain_images: torch.Tensor | None = None
    latest_images: torch.Tensor | None = None
    try:
        for name in args.rows:
            setup = known[name]
            try:
                row, measurement = run_row(name, setup, args, device, latest_images)
            except Exception as error:  # one failing lever must not lose the other rows
                row = {"name": name, **asdict(setup), "error": f"{type(error).__name__}: {_one_line(error)}"}
                row["traceback"] = traceback.format_exc()[-3000:]
                measurement = None
            if measurement is not None:
                if name == "plain":
                    plain_rate, plain_images = row["images_per_s"], measurement.check
                if plain_rate and setup.kind not in ("png", "vae") and name != "plain_fp32":
                    row["ratio_to_plain"] = row["images_per_s"] / plain_rate
                if measurement.check is not None:
                    latest_images = measurement.check
                    if plain_images is not None and name != "plain" and not setup.less_work:
                        row["agreement_with_plain"] = agreement(measurement.check, plain_images)
            results["rows"].append(row)
            print_row(row)
            save()
    finally:
        free_memory(device)
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
    summary = results["summary"]
    if "generate_images_meets_targets" in summary:
        print(
            f"generate_images: {summary['generate_images_per_s']:.2f} images/s, "
            f"{summary['generate_images_ratio_to_plain']:.2f}x plain; targets (>= {target_images_per_s:g} images/s "
            f"and >= {target_ratio:g}x plain) {'met' if summary['generate_images_meets_targets'] else 'NOT met'}"
        )
    if args.out:
        print(f"wrote {args.out}")
    return results


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400]


if __name__ == "__main__":
    main()
