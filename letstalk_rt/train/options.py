"""`letstalk train`'s options: its command line and `TrainConfig`, without torch (the CLI builds every command's parser
at start, and a command that runs no model, `letstalk camera --server` say, must not load torch for it). The training
itself is `trainer`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

STAGES = ("autoencoder", "transformer", "distill", "decoder")
SYNC_EXPERTS = ("states", "audio")  # --sync-expert


@dataclass
class TrainConfig:
    stage: str  # one of STAGES
    data: Path  # synth corpus (manifest.json) or prepared shards (index.json)
    init: Path  # model directory to start from (new-model output or the previous stage's --out)
    run: Path  # run folder: checkpoints/, log.jsonl, tensorboard/
    out: Path | None = None  # final model directory (EMA weights); None = checkpoints only
    steps: int = 1000  # optimizer steps in total (a resumed run continues to this)
    batch: int = 8  # GLOBAL batch: samples per step over all ranks
    lr: float = 1e-4  # peak learning rate
    warmup: int = 100  # linear warm-up steps from 0 to lr
    schedule: str = "cosine"  # "cosine" (to MIN_LR_RATIO * lr at the last step) or "constant"
    weight_decay: float = 0.0  # AdamW decoupled weight decay (0: tiny data sets overfit either way)
    ema: float = 0.999  # EMA decay; warmed up as min(ema, (1 + s) / (10 + s)) so short runs export sense
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    ckpt_every: int = 1000  # checkpoint period in steps (the last step is always checkpointed)
    keep: int = 3  # checkpoints kept (older ones deleted)
    log_every: int = 10  # steps per log.jsonl line
    seed: int = 0  # the data order, noise and dropout all follow from it
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    resume: bool = False  # continue from RUN's latest checkpoint
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    split: str = "train"  # synth corpus split to train on
    balance_skin_tone: bool = False  # synth corpora: every skin-tone band gets the same share of the samples
    recolour_copies: int = 0  # recoloured copies of every clip trained on beside it (data.Recolour)
    workers: int = 1  # threads assembling the next batches ahead of the step (0 = in the loop)
    mouth_weight: float = 1.0  # extra loss weight inside the clip's mouth box (pixels; latent cells for the DiT)
    sync_weight: float = 0.0  # transformer/distill: weight of the mouth expert's loss on x0_hat (train/sync.py)
    sync_decoded: bool = False  # the expert reads decoded mouth squares instead of latent cells
    sync_expert: str = "states"  # the lip-sync judge: states (MouthExpert, synth labels) or audio (AudioSyncExpert)
    pixel_mouth_weight: float = 0.0  # transformer/distill: L1 weight, x0_hat's vs the truth's decoded mouth square
    pixel_frame_weight: float = 0.0  # transformer/distill: the same over whole decoded frames
    adv_mouth_weight: float = 0.0  # weight of a critic's verdict on the network's mouth (train/sync.py MouthCritic)
    mouth_direction_weight: float = 0.0  # transformer/distill: 1 - cosine of the decoded mouth's change from the
    # portrait's, the network's clean estimate against the truth, per window (train/sync.py mouth_direction_loss)
    mouth_pattern_weight: float = 0.0  # transformer/distill: L1 of the decoded mouth squares made grey and
    # standardised per frame, clean estimate against truth: tone-free (train/sync.py mouth_pattern_loss)
    latent_cache: bool = True  # transformer/distill: read cached latents instead of encoding every step
    teacher_steps: int = 8  # distill: Euler steps of the teacher per target
    student_steps: int = 2  # distill: the student's sampling steps (written to sampling.num_steps)
    distill_target: str = "trajectory"  # distill: "trajectory" (reflow) or "velocity" (guidance only)
    portrait_start: float = 1.0  # transformer/distill: below 1, every sample is trained as a model whose
    # sampling.start_time is this samples its first step: x_t = (1 - T) portrait + T z at t = T, toward the clean
    # target (written to the exported sampling.start_time); 1 = off (x_t made from the target, t drawn)
    teacher_start: float = 1.0  # distill (trajectory): the teacher integrates from the portrait noised to this
    # flow time with the same noise, x = (1 - T) portrait + T z (1 = from pure noise z)
    window: int = 0  # transformer/distill: frames per training window, 1..num_frames (0: num_frames); train
    # a student on the model's sampling.stream_window when it streams shorter windows than num_frames
    fsdp: bool = False  # shard parameters with FSDP instead of replicating them with DDP (multi-GPU)
    decoder_channels: tuple[int, ...] | None = None  # decoder stage: the new decoder's widths (None: the current)
    decode_samples: float = 0.0  # decoder stage: the share of training windows whose latents are the model's own
    # samples (its config's sampling, from the window's audio, portrait and memory) instead of the truth's,
    # decoded toward the real frames (SampleDecoderStage); 0 = the truth's latents only (DecoderStage)
    progress: bool = True  # tqdm bar on rank 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(stage="", data=Path(), init=Path(), run=Path())
    p.add_argument("--stage", required=True, choices=STAGES, help="what to train")
    p.add_argument("--data", type=Path, required=True, help="synth corpus (manifest.json) or prepared shards (index.json)")
    p.add_argument("--init", type=Path, required=True, help="model directory to start from")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                   help="run folder: checkpoints/, log.jsonl (--run-dir under torchrun, whose --run-path makes --run ambiguous)")
    p.add_argument("--out", type=Path, default=None, help="final model directory (EMA weights)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"GLOBAL batch over all ranks (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule, help="LR after warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--ema", type=float, default=d.ema, help=f"EMA decay of the exported weights (default {d.ema})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 = off")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint period in steps")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps per log.jsonl line")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, noise and dropout seed")
    p.add_argument("--device", default=d.device, help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of this invocation, with a checkpoint (time-sliced jobs)")
    p.add_argument("--split", default=d.split, help="synth corpus split (default train)")
    p.add_argument("--balance-skin-tone", action="store_true",
                   help="synth corpora: sample every skin-tone band (5 bands of the faces' tone, and the photographs) "
                        "equally often, instead of in the corpus's proportions (its darkest and lightest faces are rare)")
    p.add_argument("--recolour-copies", type=int, default=d.recolour_copies, metavar="K",
                   help="train on K recoloured copies of every clip beside it (brightness, white balance and saturation "
                        "drawn per copy): faces of colours the corpus lacks; the latent cache grows K+1-fold (default 0)")
    p.add_argument("--workers", type=int, default=d.workers, help="threads building batches ahead (default 1)")
    p.add_argument("--mouth-weight", type=float, default=d.mouth_weight,
                   help="extra loss weight in the clip's mouth box (synth clips' own; prepared shards: the box their "
                        "framing fixes): pixels (autoencoder), latent cells (transformer, distill)")
    p.add_argument("--sync-weight", type=float, default=d.sync_weight,
                   help="transformer/distill: weight of a frozen lip-sync expert's loss on the network's clean "
                        "estimate (default 0 = off)")
    p.add_argument("--sync-expert", choices=SYNC_EXPERTS, default=d.sync_expert,
                   help="with --sync-weight: states (default; reads the synth corpus's per-frame mouth states), audio (a "
                        "SyncNet-style judge of mouth and speech, for video without mouth labels; on the synth "
                        "corpus it did not help the default model: docs/training.md)")
    p.add_argument("--sync-decoded", action="store_true",
                   help="with --sync-weight: the expert reads the mouth decoded to pixels (through the frozen decoder) "
                        "instead of its latent cells")
    p.add_argument("--pixel-mouth-weight", type=float, default=d.pixel_mouth_weight,
                   help="transformer/distill: weight of the L1 between the decoded mouth of the network's clean "
                        "estimate and of the ground truth (in the mouth box; default 0 = off)")
    p.add_argument("--pixel-frame-weight", type=float, default=d.pixel_frame_weight,
                   help="transformer/distill: weight of the L1 between the network's clean estimate and the "
                        "ground truth, both decoded to whole frames (default 0 = off)")
    p.add_argument("--adv-mouth-weight", type=float, default=d.adv_mouth_weight,
                   help="weight of an adversarial critic's verdict on the mouth the network makes (the reconstruction's; "
                        "for transformer/distill the clean estimate's, decoded), the critic trained beside it on the "
                        "true mouth (in the mouth box; the default model's distill run used 0.05, a decoder run 0.01; default 0 = off)")
    p.add_argument("--mouth-direction-weight", type=float, default=d.mouth_direction_weight,
                   help="transformer/distill: weight of 1 - cosine between how the decoded mouth of the network's clean "
                        "estimate and the ground truth's change from the portrait's, per window: a mouth moving the "
                        "wrong way costs the same on low-contrast (dark) skin as on light (default 0 = off)")
    p.add_argument("--mouth-pattern-weight", type=float, default=d.mouth_pattern_weight,
                   help="transformer/distill: weight of the L1 between the decoded mouth squares of the network's clean "
                        "estimate and of the ground truth, each made grey and standardised per frame (skin tone and "
                        "contrast taken out, as the eval probe does; default 0 = off)")
    p.add_argument("--no-latent-cache", action="store_true",
                   help="transformer/distill: encode frames with the AE every step (exact pixel noise, slower)")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="distill: teacher Euler steps")
    p.add_argument("--student-steps", type=int, default=d.student_steps, help="distill: student sampling steps")
    p.add_argument("--distill-target", choices=("trajectory", "velocity"), default=d.distill_target,
                   help="distill: regress the teacher's guided trajectory end (reflow, few-step) or its guided "
                        "velocity at x_t (guidance distillation, cheap)")
    p.add_argument("--portrait-start", type=float, default=d.portrait_start, metavar="T",
                   help="transformer/distill: train every sample from the portrait noised to flow time T (0 < T < 1), "
                        "as a model with sampling.start_time T samples its first step (default 1 = off)")
    p.add_argument("--teacher-start", type=float, default=d.teacher_start, metavar="T",
                   help="distill (trajectory): the teacher samples from the portrait noised to flow time T with the "
                        "same noise, in --teacher-steps steps from T (default 1 = from pure noise)")
    p.add_argument("--window", type=int, default=d.window,
                   help="transformer/distill: frames per training window (default 0: the model's num_frames)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with FSDP2 instead of replicating them with DDP (L/XL)")
    p.add_argument("--decoder-channels", type=parse_widths, default=None, metavar="W0,W1,...",
                   help="decoder stage: widths of the new decoder's stages, finest first, as many as the "
                        "autoencoder's (e.g. 8,16,32,64,128: a cheaper decoder for CPUs); default: fine-tune the current one")
    p.add_argument("--decode-samples", type=float, default=0.0, metavar="P",
                   help="decoder stage: the share of training windows decoded from the model's own samples (its "
                        "config's sampling) instead of the truth's latents, toward the real frames: the decoder learns "
                        "what the generated latents mean (default 0: the truth's latents only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 8,16,32,64,128") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive integers")
    return widths


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        stage=args.stage, data=args.data, init=args.init, run=args.run, out=args.out, steps=args.steps,
        batch=args.batch, lr=args.lr, warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
        ema=args.ema, grad_clip=args.grad_clip, ckpt_every=args.ckpt_every, keep=args.keep,
        log_every=args.log_every, seed=args.seed, device=args.device, resume=args.resume,
        stop_after=args.stop_after, split=args.split, balance_skin_tone=args.balance_skin_tone,
        recolour_copies=args.recolour_copies, workers=args.workers,
        mouth_weight=args.mouth_weight,
        sync_weight=args.sync_weight, sync_decoded=args.sync_decoded, sync_expert=args.sync_expert,
        pixel_mouth_weight=args.pixel_mouth_weight,
        pixel_frame_weight=args.pixel_frame_weight, adv_mouth_weight=args.adv_mouth_weight,
        mouth_direction_weight=args.mouth_direction_weight, mouth_pattern_weight=args.mouth_pattern_weight,
        latent_cache=not args.no_latent_cache, teacher_steps=args.teacher_steps,
        student_steps=args.student_steps, distill_target=args.distill_target, window=args.window, fsdp=args.fsdp,
        portrait_start=args.portrait_start, teacher_start=args.teacher_start,
        decoder_channels=args.decoder_channels, decode_samples=args.decode_samples, progress=not args.quiet)
