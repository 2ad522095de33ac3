"""Side-by-side mouths of several models at the frames where the ground truth's mouth is widest open.

    python scripts/compare_models.py DATA --model A --model B [--split test] [--clips 7,26,0] [--out FILE]

One row per chosen clip (indices into the split's sorted clip list): the ground truth, then each model's
generation of the same clip (its own sampling, noise seed 0), cropped to the metrics' mouth box (grown by a
quarter on each side) and enlarged 4x, so a mouth drawn backwards (darker where the real one shows teeth) can be seen.
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
    ap.add_argument("--model", type=Path, action="append", required=True, help="model directory (repeat)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clips", default="7,26,0", help="indices into the split's clip list")
    ap.add_argument("--out", type=Path, default=Path("mouths.png"))
    args = ap.parse_args()
    pipes = [LetsTalkPipeline.from_pretrained(m) for m in args.model]
    size = pipes[0].config.image_size
    if any(p.config.image_size != size for p in pipes):
        raise SystemExit("compare_models: every --model must have the same frame size")
    corpus = Corpus(args.data)
    names = corpus.names(args.split)
    rows = []
    for i in (int(x) for x in args.clips.split(",")):
        clip = corpus.clip(names[i], size)
        k = int(np.argmax(clip.opening))
        x0, y0, x1, y1 = clip.box  # the mouth box the metrics use (grown by 25 % on each side)
        tiles = [clip.frames[k]] + [generate_frames(p, clip.portrait, clip.audio, seed=0)[k] for p in pipes]
        rows.append(np.concatenate([t[y0:y1, x0:x1] for t in tiles], 1))
        print(f"{names[i]}: frame {k}")
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
