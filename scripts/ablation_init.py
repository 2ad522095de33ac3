"""Start points for the paper's ablations (docs/eval.md): one untrained model directory per variant.

    python scripts/ablation_init.py --base MODEL_DIR --out abl

Each variant keeps the base model's config and its trained autoencoder (frozen by the transformer stage,
so one latent cache serves every run) and gets a fresh audio encoder, projector and transformer:

    abl/init_symbiotic           portrait fused by token concatenation (the paper's choice)
    abl/init_direct              portrait through cross-attention
    abl/init_siamese             portrait through a parallel transformer branch
    abl/init_symbiotic_nonoise   symbiotic, memory-bank noise regularisation off (no pixel noise,
                                 no forward diffusion, no masking)

All sample with 8 steps and no guidance; train each with the same `letstalk train --stage transformer`
command and compare them with one `letstalk eval --model ... --model ...`.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from letstalk_rt.checkpoint import build_components, load_model, save_model

VARIANTS = {
    "symbiotic": ("symbiotic", True),
    "direct": ("direct", True),
    "siamese": ("siamese", True),
    "symbiotic_nonoise": ("symbiotic", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="model whose config and autoencoder to use "
                        "(default: the bundled model)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the init_* model directories")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed, the same for every variant")
    args = parser.parse_args()
    base = load_model(args.base)
    for name, (fusion, noise) in VARIANTS.items():
        config = copy.deepcopy(base.config)
        config.transformer.portrait_fusion = fusion
        config.sampling.num_steps, config.sampling.stream_window = 8, 0
        config.sampling.portrait_guidance = config.sampling.audio_guidance = 1.0
        if not noise:
            sc = config.sampling
            sc.train_pixel_noise = sc.train_memory_noise_max = sc.train_memory_mask_ratio = 0.0
        config.trained = False
        config.description = f"ablation start: portrait fusion {fusion}, noise regularisation {'on' if noise else 'off'}"
        comps = build_components(config, seed=args.seed)
        comps.autoencoder.load_state_dict(base.autoencoder.state_dict())
        path = save_model(comps, args.out / f"init_{name}")
        print(f"{path}: {sum(p.numel() for p in comps.transformer.parameters()) / 1e6:.2f}M transformer parameters")


if __name__ == "__main__":
    main()
