"""galore_jax: GaLore and Q-GaLore as composable Optax transforms."""

from galore_jax.adam_8bit import ScaleByAdam8bitState
from galore_jax.adam_8bit import adamw_8bit
from galore_jax.adam_8bit import scale_by_adam_8bit
from galore_jax.alias import galore_adafactor
from galore_jax.alias import galore_adam
from galore_jax.alias import galore_adamw
from galore_jax.alias import galore_adamw_8bit
from galore_jax.alias import galore_lion
from galore_jax.alias import galore_sgd
from galore_jax.alias import q_galore_adamw
from galore_jax.galore import GaLoreState
from galore_jax.galore import scale_by_adam_hf
from galore_jax.galore import scale_by_galore
from galore_jax.layerwise import Layerwise
from galore_jax.layerwise import LayerwiseState
from galore_jax.layerwise import layerwise_step
from galore_jax.projection import DimensionNumbers
from galore_jax.projection import Projectors
from galore_jax.q_galore import QGaLoreState
from galore_jax.q_galore import QuantizedProjector
from galore_jax.q_galore import apply_updates_stochastic
from galore_jax.q_galore import dequantize_params
from galore_jax.q_galore import quantize_params
from galore_jax.q_galore import scale_by_q_galore
from galore_jax.quantization import QuantizedArray
from galore_jax.sharding import state_sharding

__version__ = "0.1.0"

__all__ = (
    "DimensionNumbers",
    "GaLoreState",
    "Layerwise",
    "LayerwiseState",
    "Projectors",
    "QGaLoreState",
    "QuantizedArray",
    "QuantizedProjector",
    "ScaleByAdam8bitState",
    "adamw_8bit",
    "apply_updates_stochastic",
    "dequantize_params",
    "galore_adafactor",
    "galore_adam",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_lion",
    "galore_sgd",
    "layerwise_step",
    "q_galore_adamw",
    "quantize_params",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_galore",
    "scale_by_q_galore",
    "state_sharding",
)
