"""Model families, registered by name: `build_model({"name": "gpt", ...}, vocab_size, shape)`."""

from pydantic import ValidationError

from pipeline import ArpipeError
from pipeline.models.base import ARModel
from pipeline.models.fvsbn import FVSBN
from pipeline.models.gpt import GPT
from pipeline.models.llama import Llama
from pipeline.models.made import MADE
from pipeline.models.nade import NADE
from pipeline.models.pixelcnn import PixelCNN
from pipeline.models.rnn import GRU
from pipeline.models.wavenet import WaveNet

MODELS: dict[str, type[ARModel]] = {"gpt": GPT, "llama": Llama, "wavenet": WaveNet, "gru": GRU, "pixelcnn": PixelCNN,
                                    "fvsbn": FVSBN, "nade": NADE, "made": MADE}


def model_config(cfg: dict):
    """Validate a model section: `name` picks the family, its Config checks the other keys."""
    name = cfg.get("name")
    if name not in MODELS:
        raise ArpipeError(f"model.name {name!r} is not one of {sorted(MODELS)}")
    return MODELS[name].Config.model_validate(cfg)


def build_model(cfg: dict, vocab_size: int, shape: tuple[int, ...]) -> ARModel:
    """A model of family cfg["name"]; every other hyperparameter has a default.
    `shape` is (T,) for sequences and (C, H, W) for images."""
    try:
        config = model_config(cfg)
    except ValidationError as e:
        err = e.errors()[0]
        raise ArpipeError(f"model.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return MODELS[config.name](config, vocab_size, tuple(shape))


def check_ordering(model: ARModel, codec_config: dict, data) -> None:
    """Refuse data whose ordering is not the one a model's architecture implements, and data
    without fixed-length items for a model that orders the variables itself."""
    ordering = codec_config.get("ordering")
    if model.required_ordering and ordering != model.required_ordering:
        raise ArpipeError(f"{type(model).__name__} needs {model.required_ordering}-ordered data, but {data} holds "
                          f"{ordering or 'unordered'} data; reshard with --ordering {model.required_ordering} "
                          f"or train a 1-D model (gpt, gru)")
    if model.orders_variables:
        from pipeline.codecs import codec_classes

        codec = codec_classes().get(codec_config.get("modality"))
        # Packed or cropped blocks end padded. In its own ordering a padded row's real variables
        # condition on the padding, and a mixture's NLL is one total per row (models/made.py):
        # no exact number exists. Training and eval both call this before any collective.
        if codec is None or codec.stream_mode != "item":
            raise ArpipeError(f"{type(model).__name__} orders the variables itself and needs fixed-length items "
                              f"(images), but {data} holds {codec_config.get('modality')} data")
