"""Where is a test face's lip sync lost? For each test clip of a synth corpus, three read-outs of the mouth
opening from ground truth, against the per-frame truth (Pearson r):

- the evaluation's pixel probe on the real frames (the ceiling of the metric),
- the same probe on the model's autoencoder reconstructions (can the latent carry this mouth at all?),
- the training's latent mouth expert (`--sync-weight`) on the ground-truth latents (can the loss see it?).

If all three are high for a face the model does not animate, the loss is not the bottleneck: the
transformer is. Usage: python scripts/diagnose_mouth.py data/synth [--model DIR] [--clips 12]
(builds the training split's latent cache on first use, ~4 min on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from letstalk_rt.checkpoint import DEFAULT_MODEL_DIR, load_model
from letstalk_rt.eval import Corpus, pearson, train_probe
from letstalk_rt.models.autoencoder import decode_to_uint8, encode_frames
from letstalk_rt.train.data import LatentCache, open_dataset
from letstalk_rt.train.sync import MouthExpert, crop_origin, mouth_origins


def in_batches(fn, x, n: int = 16):
    return [fn(x[i:i + n]) for i in range(0, len(x), n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--probe-clips", type=int, default=96)
    args = ap.parse_args()

    comps = load_model(args.model)
    ae = comps.autoencoder.eval()
    size, latent_size = comps.config.image_size, comps.config.transformer.latent_size
    corpus = Corpus(args.data)
    probe = train_probe(corpus, size, args.probe_clips)
    train = open_dataset(args.data, size, "train", progress=False)
    LatentCache.build(train, ae, comps.config.sampling.train_pixel_noise, torch.device("cpu"), progress=False)
    cache = LatentCache(LatentCache.path_for(train, ae), train)
    expert = MouthExpert.fit(train, cache, MouthExpert.clip_means(train, cache),
                             mouth_origins(train, latent_size, "--sync-weight"), seed=0)
    print(expert.describe())
    print("| clip | identity | mouth box (w x h px) | probe on frames | probe on AE reconstruction | latent expert |")
    print("|---|---|---|---|---|---|")
    for clip in open_dataset(args.data, size, "test", progress=False).clips[: args.clips]:
        assert clip.mouth is not None and clip.mouth_box is not None
        gt = corpus.clip(clip.name, size)
        latents = torch.cat(in_batches(lambda f: encode_frames(ae, f), gt.frames))  # (N, C, h, w)
        recon = np.concatenate(in_batches(lambda z: decode_to_uint8(ae, z), latents))  # (N, S, S, 3)
        origin = torch.tensor(crop_origin(clip.mouth_box, size, latent_size)).expand(len(latents), 2)
        with torch.no_grad():
            read = expert(latents, latents.mean(0, keepdim=True).expand_as(latents), origin)[:, 0].numpy()
        truth = clip.mouth[: len(latents), 0]
        _, _, w, h = clip.mouth_box
        identity = json.loads((Path(args.data) / f"{clip.name}.json").read_text())["identity"]["id"]
        print(f"| {clip.name} | {identity} | {w} x {h} | {pearson(probe.predict(gt.frames, gt.box), gt.opening):.3f} "
              f"| {pearson(probe.predict(recon, gt.box), gt.opening):.3f} | {pearson(read, truth):.3f} |", flush=True)


if __name__ == "__main__":
    main()
