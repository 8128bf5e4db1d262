"""Sharpness-aware optimizers: ZSharp, SAM, ASAM and Friendly-SAM around any ``torch.optim`` class.

All follow the davda54/sam two-pass protocol (``first_step``/``second_step``) and also offer a
torch-style ``step(closure)``; see :mod:`sharpscope.optim.base` for the protocol and the GradScaler
recipe, :mod:`sharpscope.optim.zscore` for ZSharp's filter and :mod:`sharpscope.optim.bn` for the
optional BatchNorm bypass.
"""

from .base import SharpnessAwareOptimizer
from .bn import frozen_running_stats
from .fsam import FriendlySAM
from .sam import ASAM, SAM
from .zsharp import MASK_STATS_COLUMNS, ZSharp

#: The order in which optimizers appear in every table, legend and figure: base optimizers first,
#: then the sharpness-aware ones, ZSharp last (the method the comparison is about).
OPTIMIZER_ORDER: tuple[str, ...] = ("sgd", "adam", "adamw", "sam", "asam", "fsam", "zsharp")

__all__ = [
    "ASAM",
    "MASK_STATS_COLUMNS",
    "OPTIMIZER_ORDER",
    "SAM",
    "FriendlySAM",
    "SharpnessAwareOptimizer",
    "ZSharp",
    "frozen_running_stats",
]
