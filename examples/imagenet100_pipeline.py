"""DREAM-OOD and DREAM-ID on ImageNet-100, stage by stage (Du, Sun, Zhu, Li, NeurIPS 2023).

DREAM-OOD (imagined outliers, dreamood/configs/imagenet100.toml), with an ImageNet-1k folder (only the
paper's 100 classes are read, in place), the MOS OOD subsets and Stable Diffusion v1.4 on disk:

    python examples/imagenet100_pipeline.py --data data/imagenet --ood data/ood \
        --sd models/stable-diffusion-v1-4 --out runs/imagenet100

DREAM-ID (imagined inliers used as extra training data, dreamood/configs/imagenet100-dream-id.toml), with
ImageNet-A and ImageNet-V2 to measure generalisation:

    python examples/imagenet100_pipeline.py --method dream-id --data data/imagenet --ood data/ood \
        --sd models/stable-diffusion-v1-4 --imagenet-a data/imagenet-a \
        --imagenet-v2 data/imagenetv2-matched-frequency-format-val --out runs/imagenet100-dream-id

Smoke run (random data, tiny random models, CPU, seconds; add --method dream-id for the DREAM-ID wiring):

    python examples/imagenet100_pipeline.py --smoke --out /tmp/dreamood-smoke-imagenet100

--baselines all also trains the paper's baselines on the same data and prints a comparison. DREAM-OOD: GODIN
and GAN-based outliers (the GAN's DCGAN needs a power-of-two image size, so it runs in smoke runs, not at 224).
DREAM-ID (Table 4): a cross-entropy model; RandAugment, AutoAugment, AugMix and CutMix copies and generic-prompt
images appended in DREAM-ID's number; MEMO test-time adaptation of the cross-entropy model.

Every stage writes its artefact to --out and is skipped when that artefact exists (resume).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch

from dreamood.config import load_config
from dreamood.pipeline import SMOKE_BASELINES, Pipeline, accuracy_table, ood_table, parse_baselines
from dreamood.testing import smoke_setup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("dream-ood", "dream-id"), default="dream-ood")
    parser.add_argument("--out", default="runs/imagenet100", help="folder of the run's artefacts")
    parser.add_argument("--data", help="ImageNet-1k folder holding train/ and val/ class folders")
    parser.add_argument("--ood", help="folder holding iNaturalist, SUN, Places and dtd/images")
    parser.add_argument("--sd", help="Stable Diffusion v1.4 folder (or Hugging Face model id in the local cache)")
    parser.add_argument("--init-checkpoint", help="cross-entropy ResNet-34 to fine-tune (else one is trained first)")
    parser.add_argument("--imagenet-a", help="ImageNet-A folder (DREAM-ID generalisation)")
    parser.add_argument("--imagenet-v2", help="ImageNet-V2 folder (DREAM-ID generalisation)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--smoke", action="store_true", help="random data and tiny random models, CPU, seconds")
    parser.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help="'all' or a subset of godin,gan (dream-ood) or of cross-entropy,randaugment,autoaugment,augmix,cutmix,"
        "generic-prompts,memo (dream-id)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        baselines = parse_baselines(args.baselines, args.method)
    except ValueError as error:
        parser.error(f"--baselines: {error}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # The paper's ImageNet-100 settings for the chosen method, pointed at your data and weights.
    overrides: dict[str, Any] = {"output_dir": args.out, "progress": not args.no_progress}
    for key, value in (
        ("data.root", args.data),
        ("data.ood_root", args.ood),
        ("data.imagenet_a", args.imagenet_a),
        ("data.imagenet_v2", args.imagenet_v2),
        ("training.init_checkpoint", args.init_checkpoint),
        ("device", args.device),
    ):
        if value is not None:
            overrides[key] = value
    if args.sd is not None:
        overrides["anchors.model"] = overrides["generation.model"] = args.sd
    config = load_config("imagenet100" if args.method == "dream-ood" else "imagenet100-dream-id", overrides)
    data = None
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: extra threads only add overhead
        config, data = smoke_setup(config, args.out)

    pipe = Pipeline(config, data, baselines=SMOKE_BASELINES if args.smoke else None)
    pipe.write_config()

    # 1. Anchors T(y): each class name's row of Stable Diffusion's CLIP token-embedding table (768-d).
    anchors = pipe.anchors()
    # 2. Phase 1: ResNet-34 + linear projection aligned with T(y), CE(cos(z, T(y_j)) / 0.1, y) (Eq. 2).
    encoder = pipe.fit_encoder(anchors)
    # 3. Feature bank: 1,000 L2-normalised training embeddings per class.
    bank = pipe.feature_bank(encoder)
    # 4. Phase 2. DREAM-OOD: around the 200 boundary points of each class (largest k-NN distance, k = 300)
    #    draw N(z, 0.03^2 I) candidates and keep the farthest from the bank (Eq. 5). DREAM-ID: around the
    #    densest points draw N(z, 0.01^2 I) and keep the closest.
    samples = pipe.sample(bank, anchors)
    # 5. Stable Diffusion v1.4 renders each sampled embedding in place of the class token (Eq. 6).
    images = pipe.generate(samples)
    # 6. Phase 3. DREAM-OOD: fine-tune a cross-entropy ResNet-34 for 20 epochs with CE + 1.0 * energy
    #    regulariser (MLP head) on the imagined outliers (Eq. 7). DREAM-ID: train from scratch on the real
    #    images plus the imagined inliers, with their labels.
    model = pipe.train(images)
    # 7. FPR95 / AUROC / AUPR of the negative energy on iNaturalist, SUN, Places and Textures.
    report = pipe.evaluate(model)
    print(report.to_markdown())
    if config.method == "dream-id":
        # DREAM-ID's question: does the model generalise better (ImageNet-A, ImageNet-V2)?
        accuracy = pipe.generalization(model)
        for name, value in accuracy.items():
            print(f"{name}: top-1 accuracy {100 * value:.2f}%")
        if baselines:
            # 8. Table 4's baselines: the same classifier from scratch on the real images plus as many augmented
            #    copies or generic-prompt images per class, and MEMO adapting the cross-entropy model per image.
            table = {"DREAM-ID": accuracy, **{name: pipe.generalization_baseline(name) for name in baselines}}
            print(accuracy_table(table))
    elif baselines:
        # 8. The OOD baselines of the paper on the same data: GODIN and GAN-based outliers.
        print(ood_table({"DREAM-OOD": report, **{name: pipe.ood_baseline(name) for name in baselines}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
