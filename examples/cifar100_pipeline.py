"""DREAM-OOD on CIFAR-100, stage by stage (Du, Sun, Zhu, Li, "Dream the Impossible", NeurIPS 2023).

Real run, with the paper's settings (dreamood/configs/cifar100.toml) and Stable Diffusion v1.4 on disk:

    python examples/cifar100_pipeline.py --data data/cifar100 --ood data/ood \
        --sd models/stable-diffusion-v1-4 --out runs/cifar100

Smoke run: the same stages with random data and tiny random models, on a CPU in well under a minute:

    python examples/cifar100_pipeline.py --smoke --out /tmp/dreamood-smoke-cifar100

--baselines all (or godin,gan) also trains the paper's OOD baselines on the same data and prints a comparison:
GODIN (Hsu et al., CVPR 2020) and GAN-based outlier synthesis (Lee et al., ICLR 2018).

Every stage writes its artefact to --out and is skipped when that artefact exists, so an interrupted run
resumes where it stopped. docs/cli.md lists the expected time of each stage on one GPU.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch

from dreamood.config import load_config
from dreamood.pipeline import SMOKE_BASELINES, Pipeline, ood_table, parse_baselines
from dreamood.testing import smoke_setup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/cifar100", help="folder of the run's artefacts")
    parser.add_argument("--data", help="folder holding cifar-100-python/")
    parser.add_argument("--ood", help="folder holding dtd/images, svhn/test_32x32.mat, places365, LSUN_C, iSUN")
    parser.add_argument("--sd", help="Stable Diffusion v1.4 folder (or Hugging Face model id in the local cache)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--smoke", action="store_true", help="random data and tiny random models, CPU, seconds")
    parser.add_argument("--baselines", default="", metavar="NAMES", help="'all' or a subset of godin,gan")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        baselines = parse_baselines(args.baselines, "dream-ood")
    except ValueError as error:
        parser.error(f"--baselines: {error}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # The paper's CIFAR-100 settings, pointed at your data and weights.
    overrides: dict[str, Any] = {"output_dir": args.out, "progress": not args.no_progress}
    for key, value in (("data.root", args.data), ("data.ood_root", args.ood), ("device", args.device)):
        if value is not None:
            overrides[key] = value
    if args.sd is not None:
        overrides["anchors.model"] = overrides["generation.model"] = args.sd
    config = load_config("cifar100", overrides)
    data = None
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: extra threads only add overhead
        config, data = smoke_setup(config, args.out)

    pipe = Pipeline(config, data, baselines=SMOKE_BASELINES if args.smoke else None)
    pipe.write_config()

    # 1. Anchors T(y): each class name's row of Stable Diffusion's CLIP token-embedding table (768-d).
    anchors = pipe.anchors()
    # 2. Phase 1: ResNet-34 (3x3 stem) + linear projection, trained so that h(x)/||h(x)|| aligns with T(y):
    #    L = CE(cos(z, T(y_j)) / 0.1, y)  (Eq. 2).
    encoder = pipe.fit_encoder(anchors)
    # 3. Feature bank: 500 L2-normalised training embeddings per class.
    bank = pipe.feature_bank(encoder)
    # 4. Phase 2: per class, the 50 bank points with the largest k-NN distance (k = 300) are the boundary;
    #    around them draw N(z, 0.07^2 I) candidates and keep those farthest from the bank (Eq. 5).
    samples = pipe.sample(bank, anchors)
    # 5. Stable Diffusion v1.4 renders each sampled embedding in place of the class token of
    #    "A high-quality photo of a <class>" (Eq. 6): 1,000 outlier images per class.
    images = pipe.generate(samples)
    # 6. Phase 3: ResNet-34 from scratch, CE + 2.5 * energy regulariser on the imagined outliers (Eq. 7).
    model = pipe.train(images)
    # 7. FPR95 / AUROC / AUPR of the negative energy on Textures, SVHN, Places365, LSUN-C and iSUN.
    report = pipe.evaluate(model)
    print(report.to_markdown())
    if baselines:
        # 8. The paper's baselines on the same data, each trained from scratch with the same recipe: GODIN
        #    (decomposed confidence, input perturbation chosen on ID data) and a classifier trained jointly with
        #    a GAN whose samples it must find uncertain (scored with the maximum softmax probability).
        reports = {"DREAM-OOD": report, **{name: pipe.ood_baseline(name) for name in baselines}}
        print(ood_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
