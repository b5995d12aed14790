"""The GPU benchmark scripts run end to end on the CPU with tiny models, and their measurement helpers are right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Rows of the generation smoke run: every kind of measurement once. The compiled rows left out (compile_unet,
# max_autotune, cudagraphs, batch_<n>) run the code of compile_vae with other settings. The first row fails on
# purpose (nothing rendered yet to encode): the run must go on.
GENERATION_ROWS = [
    "png_encode",
    "plain",
    "decoder",
    "channels_last",
    "fused_qkv",
    "compile_vae",
    "bf16",
    "generate_images",
    "generate_images_inline",
    "png_encode",
    "vae_decode_2",
    "dpm_solver",
    "lcm_lora",
    "turbo",
    "plain_fp32",
]


def _load(name: str) -> ModuleType:
    """Import a benchmark script as a module without leaving its folder on ``sys.path``."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the script is executed
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def _run(script: str, arguments: list[str], tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Run a benchmark script as its command line does, from another folder, on one thread; return JSON and stdout."""
    out = tmp_path / f"{script}.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--tiny", *arguments, "--out", str(out)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def test_generation_benchmark_runs_and_the_fast_path_reproduces_the_plain_images(tmp_path: Path) -> None:
    results, stdout = _run(
        "bench_generation", ["--rows", *GENERATION_ROWS, "--vae-batch-sizes", "2", "--work-dir", "work"], tmp_path
    )
    rows = results["rows"]
    assert [row["name"] for row in rows] == GENERATION_ROWS
    assert "earlier row" in rows[0]["error"]  # nothing rendered yet: recorded, and the run went on
    done = rows[1:]
    assert all("error" not in row for row in done), [row.get("error") for row in done]
    by_name = {row["name"]: row for row in done}
    plain = by_name["plain"]["images_per_s"]
    for row in done:
        assert row["images_per_s"] > 0 and math.isclose(row["images_per_s"], row["images"] / sum(row["batch_seconds"]))
        assert row["name"] in stdout
        if "ratio_to_plain" in row:
            assert math.isclose(row["ratio_to_plain"], row["images_per_s"] / plain)
    assert set(by_name) - {row["name"] for row in done if "ratio_to_plain" in row} == {
        "png_encode",
        "vae_decode_2",
        "plain_fp32",
    }
    # Decoding a class's own token embedding is the plain prompt: in float32 the images agree to the 8-bit level.
    for name in ("decoder", "channels_last", "fused_qkv", "compile_vae", "plain_fp32"):
        check = by_name[name]["agreement_with_plain"]
        assert check["images"] == 2 and check["max_abs"] <= 1 / 255 + 1e-12, (name, check)
    assert by_name["plain_fp32"]["agreement_with_plain"]["psnr_db"] is None  # the same computation: identical
    bf16 = by_name["bf16"]["agreement_with_plain"]
    assert bf16["mean_abs"] > 0 and bf16["psnr_db"] > 20
    assert "agreement_with_plain" not in by_name["dpm_solver"] and by_name["dpm_solver"]["less_work"]
    # Few-step rows: less work, each checked against the plain pipeline with the same setting (exact in float32).
    for name, scheduler in (("dpm_solver", "dpm++"), ("lcm_lora", "lcm"), ("turbo", "turbo")):
        row = by_name[name]
        assert row["less_work"] and "LESS WORK" in row["description"] and row["scheduler"] == scheduler
        assert "agreement_with_plain" not in row
        assert row["agreement_with_plain_same_setting"]["max_abs"] <= 1 / 255 + 1e-12, name
        assert row["image_stats"]["pixel_std"] > 0.01 and row["image_stats"]["saturated_pixel_fraction"] < 0.5
    assert by_name["lcm_lora"]["lora"] and by_name["lcm_lora"]["guidance_scale"] == 1.0
    assert by_name["turbo"]["guidance_scale"] == 0.0 and by_name["turbo"]["steps"] == 1
    assert by_name["generate_images"]["megabytes_written"] > 0
    threaded, inline = by_name["generate_images"], by_name["generate_images_inline"]
    assert threaded["writer_threads"] == 4 and inline["writer_threads"] == 0
    assert inline["megabytes_written"] == threaded["megabytes_written"]
    assert not (tmp_path / "work" / "generate_images").exists()  # written images are removed after timing
    summary = results["summary"]
    assert summary["plain_images_per_s"] == plain
    assert math.isclose(summary["generate_images_ratio_to_plain"], by_name["generate_images"]["images_per_s"] / plain)
    expected = summary["generate_images_per_s"] >= 7.0 and summary["generate_images_ratio_to_plain"] >= 2.0
    assert math.isclose(summary["writer_threads_speedup"], summary["generate_images_per_s"] / inline["images_per_s"])
    assert summary["generate_images_meets_targets"] == expected
    assert results["environment"]["weights"] == "tiny random test models"


def test_training_benchmark_runs_every_row(tmp_path: Path) -> None:
    results, stdout = _run("bench_training", [], tmp_path)
    bench = _load("bench_training")
    rows = results["rows"]
    assert [row["name"] for row in rows] == list(bench.SETUPS)
    assert all("error" not in row for row in rows), [row.get("error") for row in rows]
    config = results["config"]
    plain = rows[0]["images_per_s"]
    for row in rows:
        assert len(row["epoch_seconds"]) == config["epochs"]
        assert row["images"] == config["steps"] * config["batch_size"] * config["epochs"]
        assert math.isclose(row["images_per_s"], row["images"] / sum(row["epoch_seconds"]))
        assert math.isclose(row["ratio_to_plain"], row["images_per_s"] / plain)
        assert row["name"] in stdout
    summary = results["summary"]
    fast = next(row for row in rows if row["name"] == "loop_fast")
    assert summary["loop_fast_ratio_to_plain"] == fast["ratio_to_plain"]
    assert summary["meets_target"] == (fast["ratio_to_plain"] >= 3.0)


def test_agreement_matches_a_from_scratch_psnr() -> None:
    bench = _load("bench_generation")
    generator = np.random.default_rng(0)
    first = generator.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    second = np.clip(first.astype(np.int64) + generator.integers(-3, 4, size=first.shape), 0, 255).astype(np.uint8)
    result = bench.agreement(torch.from_numpy(first), torch.from_numpy(second))
    difference = np.abs(first.astype(np.float64) - second.astype(np.float64))
    assert result["images"] == 3
    assert result["max_abs"] == pytest.approx(difference.max() / 255)
    assert result["mean_abs"] == pytest.approx(difference.mean() / 255)
    assert result["psnr_db"] == pytest.approx(20 * np.log10(255) - 10 * np.log10(np.mean(difference**2)))
    same = bench.agreement(torch.from_numpy(first), torch.from_numpy(first.copy()))
    assert same["max_abs"] == 0 and same["psnr_db"] is None
    # Sets of different sizes are compared on their common first images.
    assert bench.agreement(torch.from_numpy(first[:2]), torch.from_numpy(second))["images"] == 2


def test_to_uint8_rounds_like_the_png_writers() -> None:
    bench = _load("bench_generation")
    values = torch.tensor([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.2])
    expected = np.clip(np.round(values.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    assert bench.to_uint8(values).tolist() == expected.tolist()


def test_epoch_batches_cycle_and_time_whole_passes() -> None:
    bench = _load("bench_training")
    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(3)]
    loader = bench.EpochBatches(batches, steps=5, device=torch.device("cpu"))
    assert len(loader) == 5
    first_pass = [int(images[0, 0]) for images, _ in loader]
    assert first_pass == [0, 1, 2, 0, 1]
    assert len(loader.seconds) == 1 and loader.seconds[0] >= 0
    for _ in zip(range(2), loader):  # a pass abandoned early is not timed
        pass
    assert len(loader.seconds) == 1


def test_generation_rows_and_arguments_are_checked() -> None:
    bench = _load("bench_generation")
    args = bench.parse_args(["--tiny", "--batch-sizes", "3", "5", "--vae-batch-sizes", "4"])
    assert args.rows[:6] == ["plain", "decoder", "channels_last", "fused_qkv", "compile_unet", "compile_vae"]
    assert {"batch_3", "batch_5", "vae_decode_4"} <= set(args.rows) and args.check_images <= args.batch_size
    setups = bench.setups(args)
    fast = setups["compile_vae"]
    assert fast.channels_last and fast.fused_qkv and fast.compile_unet and fast.compile_vae
    assert setups["cudagraphs"].compile_mode == "reduce-overhead" and setups["dpm_solver"].less_work
    assert setups["lcm_lora"].less_work and setups["lcm_lora"].lora and setups["turbo"].less_work
    for bad in (["--rows", "no_such_row"], ["--size", "30"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--tiny", *bad])


def test_sampler_benchmark_runs_and_matches_the_reference_on_a_small_problem(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    bench = _load("bench_sampler")
    small = ["--classes", "2", "--total-classes", "4", "--bank-per-class", "60", "--dim", "16"]
    small += ["--num-per-class", "40", "-k", "5", "--boundary-size", "10", "--anchors-per-round", "5"]
    small += ["--candidates", "30", "--reference-rounds", "2", "--threads", "1", "--out", str(out)]
    results = bench.main(small)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    measured = results["results"]
    assert measured["check_same_anchors_as_reference"]
    assert measured["check_max_abs_vector_difference_to_reference"] < 1e-5
    assert math.isclose(measured["ours_full_problem_wall_s_extrapolated"], measured["ours_per_class_wall_s"] * 4)
    assert results["config"]["generator_device"] == "cpu"


def test_sd14_architecture_has_the_published_sizes(tmp_path: Path) -> None:
    architecture = _load("sd14_architecture")
    pipeline = architecture.sd14_pipeline(tmp_path, device="meta", dtype=torch.float16)

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    # Parameter counts of CompVis/stable-diffusion-v1-4's unet/, vae/ and text_encoder/ (CLIP ViT-L/14 text model).
    assert count(pipeline.unet) == 859_520_964
    assert count(pipeline.vae) == 83_653_863
    assert count(pipeline.text_encoder) == 123_060_480
    assert pipeline.unet.dtype == torch.float16
    unet, text = pipeline.unet.config, pipeline.text_encoder.config
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280) and unet.cross_attention_dim == 768
    assert tuple(pipeline.vae.config.block_out_channels) == (128, 256, 512, 512)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.max_position_embeddings, text.vocab_size) == (3072, 77, 49408)
    ids = pipeline.tokenizer(["A high-quality photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and max(ids) < text.vocab_size
