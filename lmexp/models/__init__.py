"""Language-model architectures, registered by name (`model.arch`) behind one protocol
(lmexp.models.base.LanguageModel); `build_model` is the only way to make one.

A new architecture is one module here with a class that has `from_config`, `keys` and
`dropout_kinds` (lmexp.models.base.Architecture), one line in MODELS, and a conf/model or
conf/experiment YAML that selects it; the engine, evaluation, generation, the cache, dynamic
evaluation and the served MLflow model (which ships this package) need no edit. Modules here
import nothing from lmexp but the schema and each other, so the served model can carry them.
"""

from __future__ import annotations

from lmexp.config import DropoutConfig, ModelConfig
from lmexp.models.base import Architecture, LanguageModel, State
from lmexp.models.rnn import RNNLanguageModel
from lmexp.models.transformer import TransformerLanguageModel

MODELS: dict[str, type[Architecture]] = {
    "rnn": RNNLanguageModel,
    "transformer": TransformerLanguageModel,
}

__all__ = ["MODELS", "LanguageModel", "State", "build_model"]


def build_model(model: ModelConfig, dropout: DropoutConfig, vocab_size: int) -> LanguageModel:
    """The architecture `model.arch` names, built from the (validated) config."""
    return MODELS[model.arch].from_config(model, dropout, vocab_size)
