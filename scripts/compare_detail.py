"""Side-by-side frames of a model with and without the portrait detail transfer (docs/eval.md).

    python scripts/compare_detail.py DATA [--model DIR] [--split validation] [--clips 0,4,10] [--out FILE]

For each chosen clip of the corpus split, the frame where the ground-truth mouth is widest open:
ground truth | generated, transfer off | generated, transfer on (the model's setting, or 12 when it is off)
| the transfer's weight (white = the portrait's detail added in full, black = kept off: the region moved).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from letstalk_rt.eval import Corpus, generate_frames
from letstalk_rt.pipeline import LetsTalkPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--clips", default="0,4,10", help="indices into the split's clip list")
    ap.add_argument("--out", type=Path, default=Path("detail_transfer.png"))
    args = ap.parse_args()
    on = LetsTalkPipeline.from_pretrained(args.model)
    width = on.detail_transfer or 12.0
    on = LetsTalkPipeline(on.components, detail_transfer=width)
    off = LetsTalkPipeline(on.components, detail_transfer=0)
    corpus = Corpus(args.data)
    names = corpus.names(args.split)
    rows = []
    for i in (int(x) for x in args.clips.split(",")):
        clip = corpus.clip(names[i], on.config.image_size)
        k = int(np.argmax(clip.opening))
        plain = generate_frames(off, clip.portrait, clip.audio, seed=0)[k]
        sharp = generate_frames(on, clip.portrait, clip.audio, seed=0)[k]
        # the weight the transfer used at frame k: (sharp - plain) / detail, where the detail is not ~0
        p = on.prepare_portrait(clip.portrait, detect=False)
        on.decode(p.latent[None], [on.new_stream(p)])  # fills p.detail
        detail = ((p.detail.permute(1, 2, 0) + 1) * 127.5 - 127.5).cpu().numpy()  # type: ignore[union-attr]
        added = sharp.astype(np.float32) - plain.astype(np.float32)
        strong = np.abs(detail).sum(-1) > 6
        weight = np.where(strong, (added * detail).sum(-1) / np.maximum((detail * detail).sum(-1), 1e-6), np.nan)
        weight = np.nan_to_num(np.clip(weight, 0, 1), nan=0.5)  # grey where the portrait has no detail to add
        rows.append(np.concatenate([clip.frames[k], plain, sharp, np.repeat((weight[..., None] * 255).astype(np.uint8), 3, -1)], 1))
        print(f"{names[i]}: frame {k}")
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
