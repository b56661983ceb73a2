"""galore_jax: GaLore and Q-GaLore as composable Optax transforms."""

from galore_jax.galore import GaLoreState
from galore_jax.galore import galore_adafactor
from galore_jax.galore import galore_adam
from galore_jax.galore import galore_adamw
from galore_jax.galore import galore_lion
from galore_jax.galore import galore_sgd
from galore_jax.galore import scale_by_adam_hf
from galore_jax.galore import scale_by_galore
from galore_jax.projection import DimensionNumbers
from galore_jax.projection import Projectors

__version__ = "0.1.0"

__all__ = (
    "DimensionNumbers",
    "GaLoreState",
    "Projectors",
    "galore_adafactor",
    "galore_adam",
    "galore_adamw",
    "galore_lion",
    "galore_sgd",
    "scale_by_adam_hf",
    "scale_by_galore",
)
