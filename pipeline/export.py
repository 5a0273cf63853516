"""Exported models: consolidated fp32 weights (safetensors), the model's config and the codec.

OUT/export/model.safetensors   fp32 weights, whatever the ZeRO stage and precision of training
OUT/export/model.json          model config, vocab size, shape, step, MLflow run
OUT/export/codec.json + files  the codec (e.g. tokenizer.json), to decode samples without shards

Loading never unpickles: safetensors and JSON only.
"""

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from pipeline import ArpipeError
from pipeline.codecs import Codec, codec_files, load_codec
from pipeline.models import ARModel, build_model


def full_fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under DeepSpeed: every rank calls it. The fp32 master weights for ZeRO 1–3 and
    bf16 (gathered from their partitions); plain parameters otherwise."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param).detach().float().cpu().clone()
    return state


def save_export(directory: Path, state: dict[str, torch.Tensor], model_cfg: dict, vocab_size: int,
                shape: tuple, codec_config: dict, codec_dir: Path, info: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(model_cfg, vocab_size, shape)
    missing = set(dict(model.named_parameters())) - set(state)
    if missing:
        raise ArpipeError(f"export is missing parameters {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])
    save_model(model, str(directory / "model.safetensors"))  # handles tied weights
    meta = {"model": model_cfg, "vocab_size": vocab_size, "shape": list(shape), **info}
    (directory / "model.json").write_text(json.dumps(meta, indent=1))
    (directory / "codec.json").write_text(json.dumps(codec_config, indent=1))
    for name in codec_files(codec_config, codec_dir):  # the codec's own files, e.g. tokenizer.json
        shutil.copy(codec_dir / name, directory / name)
    return directory


def find_export(path: str | Path) -> Path:
    """An export directory, or a run's out_dir holding one."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "model.safetensors").exists():
            return candidate
    raise ArpipeError(f"no exported model in {path} (expected model.safetensors there or in {path}/export)")


def load_export(path: str | Path) -> tuple[ARModel, Codec, dict]:
    directory = find_export(path)
    meta = json.loads((directory / "model.json").read_text())
    model = build_model(meta["model"], meta["vocab_size"], tuple(meta["shape"]))
    try:
        load_model(model, str(directory / "model.safetensors"))
    except Exception as e:  # safetensors reads tensors only; anything else is not a model of ours
        raise ArpipeError(f"cannot load {directory / 'model.safetensors'}: {e}") from None
    model.eval()
    codec = load_codec(json.loads((directory / "codec.json").read_text()), directory)
    return model, codec, meta


def consolidate_checkpoint(path: str | Path) -> tuple[ARModel, Codec, dict]:
    """A model from a training checkpoint: OUT/checkpoints (its `latest`) or one step_* directory.

    ZeRO 1–3 partitions are merged with DeepSpeed's zero_to_fp32; stage 0 holds whole weights."""
    from pipeline.data.shards import Shards

    path = Path(path)
    if (path / "checkpoints" / "latest").exists():
        path = path / "checkpoints"
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    state_file = path / "trainer_state.json"
    if not state_file.exists():
        raise ArpipeError(f"{path} is neither an export nor an arpipe checkpoint")
    meta = json.loads(state_file.read_text())
    model = build_model(meta["model"], meta["vocab_size"], tuple(meta["shape"]))
    stage = meta["config"]["train"]["zero_stage"]
    if stage == 0:
        try:
            states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ArpipeError(f"refusing to load checkpoint {path}: it holds objects other than tensors "
                              f"and plain data ({str(e).splitlines()[0][:200]})") from None
        weights = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pipeline.train.checkpoint import safe_torch_load

        try:
            with safe_torch_load():
                weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except pickle.UnpicklingError as e:
            raise ArpipeError(f"refusing to load checkpoint {path}: it holds objects other than tensors "
                              f"and plain data ({str(e).splitlines()[0][:200]})") from None
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    missing = set(dict(model.named_parameters())) - set(weights)
    if missing:
        raise ArpipeError(f"checkpoint {path} lacks parameters {sorted(missing)[:5]}")
    model.eval()
    return model, Shards(meta["data"]).codec, {**meta, "step": meta["step"]}


def load_any(path: str | Path) -> tuple[ARModel, Codec, dict]:
    """An export, a run directory with an export, or a checkpoint."""
    try:
        directory = find_export(path)
    except ArpipeError:
        return consolidate_checkpoint(path)
    return load_export(directory)
