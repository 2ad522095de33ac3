"""Full frames with and without the photo's detail gated back in: flicker and detail in the still parts of the face.

    python scripts/full_frame_quality.py PHOTO [--side 720] [--audio SPEECH] [--model DIR]

Generates the speech on the photo's face once (the bundled model and speech by default), pastes the same crops back
into the photo twice (`LetsTalkPipeline.full_frame`: gated, as shipped, and plain) and prints, over the face's square
with the mouth and jaw left out (the lower middle): the frame-to-frame change (flicker, grey levels), the mean
horizontal gradient (detail) and the mean difference from the photo itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from letstalk_rt.framing import FullFrame
from letstalk_rt.media import load_audio, load_image
from letstalk_rt.pipeline import LetsTalkPipeline

ASSETS = Path(__file__).resolve().parent.parent / "letstalk_rt" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photo", type=Path)
    p.add_argument("--side", type=int, default=720, help="the full frames' longest side (default 720)")
    p.add_argument("--audio", type=Path, default=ASSETS / "speech.ogg")
    p.add_argument("--model", type=Path, default=None)
    args = p.parse_args()
    pipe = LetsTalkPipeline.from_pretrained(args.model)
    portrait = pipe.prepare_portrait(load_image(args.photo))
    crops = list(pipe.generate(portrait, load_audio(args.audio)))
    gated = pipe.full_frame(portrait, args.side)
    x, y, w, h = gated.face_box
    photo = gated.canvas[max(0, y):y + h, max(0, x):x + w].astype(np.float32)
    report = {"photo": str(args.photo), "frame": list(gated.size), "face_box": list(gated.face_box), "frames": len(crops)}
    for name in ("gated", "plain"):
        paste = pipe.full_frame(portrait, args.side) if name == "gated" else \
            FullFrame(portrait.photo, portrait.box, args.side)  # the crops pasted as they are
        square = np.stack([paste(c) for c in crops])[:, max(0, y):y + h, max(0, x):x + w].astype(np.float32)
        H, W = square.shape[1:3]
        still = np.ones((H, W), bool)
        still[int(0.45 * H):int(0.95 * H), int(0.25 * W):int(0.75 * W)] = False  # the mouth and jaw
        report[name] = {"flicker": round(float(np.abs(np.diff(square, axis=0)).mean(-1)[:, still].mean()), 3),
                        "detail": round(float(np.abs(np.diff(square, axis=2)).mean()), 2),
                        "off_photo": round(float(np.abs(square - photo[None]).mean(-1)[:, still].mean()), 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
