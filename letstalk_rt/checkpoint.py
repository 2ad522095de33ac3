"""Model directories: `config.json` plus one `*.safetensors` per component, and the default-model lookup.

    MODEL_DIR/
      config.json                   ModelConfig (letstalk_rt.config), incl. `trained` and `description`
      autoencoder.safetensors       DCAutoencoder (absent for a diffusers DC-AE: it loads from
                                    autoencoder.diffusers_path)
      audio_encoder.safetensors     MelAudioEncoder (absent for wav2vec2: it loads from audio.wav2vec2_path)
      audio_projector.safetensors   AudioProjector
      transformer.safetensors       LetsTalkTransformer

Weights are never initialised at random behind the user's back: `load_components` needs every file,
and random weights come only from `build_components(config, seed)`, which callers ask for explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .errors import ModelError, OutputError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
COMPONENT_FILES = ("autoencoder", "audio_encoder", "audio_projector", "transformer")


@dataclass
class Components:
    """The networks of one model, on the CPU in fp32 until the pipeline moves them."""

    config: ModelConfig
    autoencoder: nn.Module
    audio_encoder: nn.Module
    audio_projector: nn.Module
    transformer: nn.Module

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENT_FILES}


def _has_weights(config: ModelConfig, name: str) -> bool:
    """wav2vec2 and a diffusers DC-AE are frozen and loaded from their own directories, so they are not stored
    with the model."""
    if name == "autoencoder":
        return not config.autoencoder.diffusers_path
    return not (name == "audio_encoder" and config.audio.encoder == "wav2vec2")


def build_autoencoder(config: ModelConfig) -> nn.Module:
    """The project's DCAutoencoder (random init), or the diffusers DC-AE at autoencoder.diffusers_path (loaded),
    which must give the latents the config describes."""
    from .models.autoencoder import DCAutoencoder, load_diffusers_dcae

    ac = config.autoencoder
    if not ac.diffusers_path:
        return DCAutoencoder(ac)
    ae = load_diffusers_dcae(ac.diffusers_path, image_size=ac.image_size)
    got = (ae.config.latent_channels, ae.config.downsample, ae.config.scaling_factor)
    want = (ac.latent_channels, ac.downsample, ac.scaling_factor)
    if got != want:
        raise ModelError(f"the DC-AE at '{ac.diffusers_path}' makes latents of {got[0]} channels at {got[1]}x "
                         f"downsampling with scaling factor {got[2]:g}; this model's config says {want[0]}, {want[1]}x, "
                         f"{want[2]:g}: make the model with `letstalk new-model --dcae DIR`, which reads them from it")
    return ae.requires_grad_(False)


def build_components(config: ModelConfig, seed: int = 0, autoencoder: nn.Module | None = None) -> Components:
    """Fresh networks for `config`, randomly initialised from `seed` (benchmarks, training starts); `autoencoder`:
    one already built for it (a pretrained DC-AE loaded to read its config), not loaded again."""
    from .models.audio import AudioProjector, build_audio_encoder
    from .models.letstalk import LetsTalkTransformer

    torch.manual_seed(seed)
    return Components(
        config=config,
        autoencoder=build_autoencoder(config) if autoencoder is None else autoencoder,
        audio_encoder=build_audio_encoder(config.audio),
        audio_projector=AudioProjector(config.audio),
        transformer=LetsTalkTransformer(config.transformer),
    )


def save_model(components: Components, path: str | Path) -> Path:
    """Write a model directory (created if needed); tensors are stored contiguous, fp32."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(components.config.to_json() + "\n")
    for name, module in components.modules().items():
        if not _has_weights(components.config, name):
            continue
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(path / f"{name}.safetensors"))
        os.chmod(path / f"{name}.safetensors", 0o644)  # safetensors writes 0600; a model is meant to be shared
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory '{path}' does not exist; pass --model DIR of a saved model, "
                         "or omit it to use the bundled default")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"'{path}' is not a model directory: config.json is missing")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"'{cfg_file}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"'{cfg_file}' must hold a JSON object")
    try:
        return ModelConfig.from_dict(data)
    except TypeError as e:
        raise ModelError(f"'{cfg_file}' does not match this version's configuration: {e}") from None


def load_model(path: str | Path | None = None) -> Components:
    """Load every component of a model directory (the bundled default when `path` is None)."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    config = read_config(path)
    components = build_components(config)
    for name, module in components.modules().items():
        if not _has_weights(config, name):
            continue
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ModelError(f"model directory '{path}' is incomplete: {file.name} is missing")
        try:
            state = load_file(str(file))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelError(f"'{file}' could not be read: {e}") from None
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ModelError(f"'{file}' does not fit config.json: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ModelError(f"'{file}' does not fit config.json: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    for module in components.modules().values():
        module.eval()
    return components


def weights_digest(module: nn.Module) -> str:
    """16 hex digits over a module's weights (names, shapes and values, in their own dtype): the one digest the
    caches, a resumed run's --init and a model's wav2vec2 checkpoint are checked with."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(f"{key}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fsync_dir(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling folder, flush it to disk, then rename it to `final` (replacing a model
    dir there): a kill or a power cut leaves the old folder or the new one, never half of one."""
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        fsync_dir(tmp)
        if final.exists():
            if not (final / "config.json").is_file() and any(final.iterdir()):
                raise OutputError(f"'{final}' exists and is not a model directory; choose another --out")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write '{final}': {getattr(e, 'strerror', None) or e}; free disk space or choose "
                          "another path") from e
