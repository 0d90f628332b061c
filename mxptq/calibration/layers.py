"""Which model class calibration builds, and where its stack of transformer layers is.

Calibration runs one transformer layer at a time, so it needs the `nn.ModuleList` of the
model's `num_hidden_layers` layers: decoder stacks (`model.layers`, GPT-2's `transformer.h`)
and encoder stacks (BERT's `encoder.layer`). The class is the one the checkpoint was saved from
(config.json's `architectures`), so module names equal the checkpoint's tensor names: a causal
LM through AutoModelForCausalLM as before, an encoder (`BertModel`) through its own class.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import MxptqError

# Last part of the name of a layer stack: decoders (`layers`, `h`, `blocks`), BERT-style
# encoders (`layer`).
STACK_NAMES = ("layers", "layer", "h", "blocks")


def is_causal(config) -> bool:
    """config.json names a causal LM (or names nothing: the former default)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = set(getattr(config, "architectures", None) or ())
    return not archs or bool(archs & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


def model_class(config):
    """AutoModelForCausalLM for a causal LM; else the architecture's own class when
    transformers has it (an encoder, e.g. BertModel), else AutoModel."""
    import transformers

    if is_causal(config):
        return transformers.AutoModelForCausalLM
    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def build(cls, config, dtype):
    """`cls` built from `config` (an Auto class or a model class)."""
    if hasattr(cls, "from_config"):
        return cls.from_config(config, dtype=dtype)
    return cls._from_config(config, dtype=dtype)


def _stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of num_hidden_layers modules of one class, named like a layer stack, and
    not inside another such list (a T5 block's `layer` list of sub-layers is none)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) == n and n
                and name.rpartition(".")[2] in STACK_NAMES
                and len({type(m) for m in mod}) == 1
                and not any(name.startswith(f"{outer}.") for outer, _ in found)):
            found.append((name, mod))
    return found


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The one stack of transformer layers (`_stacks`); with several (a vision tower beside
    the text model), the one inside the model's decoder (`get_decoder()`); else None: an
    encoder-decoder, or a layout calibration does not know."""
    found = _stacks(model)
    if len(found) > 1 and hasattr(model, "get_decoder"):
        try:
            dec = {id(m) for m in model.get_decoder().modules()}
        except Exception:  # no decoder to tell them apart
            dec = set()
        found = [(n, m) for n, m in found if id(m) in dec]
    return found[0] if len(found) == 1 else None


def transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """`find_layers`, or one clear error naming the model class."""
    found = find_layers(model)
    if found is None:
        n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        raise MxptqError(
            f"calibration cannot find the one stack of transformer layers of "
            f"{type(model).__name__} (a list of num_hidden_layers = {n} modules of one class "
            f"named {', '.join(STACK_NAMES)}; encoder-decoder models have two); quantize "
            "without calibration flags (RTN)")
    return found


def check_calibratable(model_dir: Path) -> bool:
    """Refuse, before any output is written, a model whose layer stack calibration cannot
    find; returns whether it is a causal LM (`--calib generate` needs one)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        try:
            model = build(model_class(config), config, None)
        except Exception as e:  # transformers' own refusal of the config, in one line
            raise MxptqError(f"calibration cannot build {model_dir}'s model class "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                             "quantize without calibration flags (RTN)") from None
    transformer_layers(model)
    return is_causal(config)
