"""Sharpness-aware optimizers: ZSharp, SAM, ASAM and Friendly-SAM around any ``torch.optim`` class.

All follow the davda54/sam two-pass protocol (``first_step``/``second_step``) and also offer
``step(closure)`` for both the davda54 and the torch closure conventions; see
:mod:`sharpscope.optim.base` for the protocol, the closure contract and the GradScaler recipe,
:mod:`sharpscope.optim.zscore` for ZSharp's filter and its pure ascent (:func:`zsharp_ascent`) and
:mod:`sharpscope.optim.bn` for the optional BatchNorm bypass.
"""

from .base import SharpnessAwareOptimizer
from .bn import frozen_running_stats
from .fsam import FriendlySAM
from .sam import ASAM, SAM
from .zscore import FilteredTensorStats, ZSharpAscent, zsharp_ascent
from .zsharp import MASK_STATS_COLUMNS, ZSharp

#: The order in which optimizers appear in every table, legend and figure: base optimizers first,
#: then the sharpness-aware ones, ZSharp last (the method the comparison is about).
OPTIMIZER_ORDER: tuple[str, ...] = ("sgd", "adam", "adamw", "sam", "asam", "fsam", "zsharp")

__all__ = [
    "ASAM",
    "MASK_STATS_COLUMNS",
    "OPTIMIZER_ORDER",
    "SAM",
    "FilteredTensorStats",
    "FriendlySAM",
    "SharpnessAwareOptimizer",
    "ZSharp",
    "ZSharpAscent",
    "frozen_running_stats",
    "zsharp_ascent",
]
