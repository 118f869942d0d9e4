"""moonfast's data pipeline: decoding and cache (`.core`), batch augmentation (`.augment`), Tiny ImageNet (`.imagenet`) and segmentation (`.seg`) loaders."""
# Hand-written (the one hand-written file of the package): re-exports the submodules so `from moonfast.data import seg_dls` works.
from .core import *
from .augment import *
from .imagenet import *
from .seg import *
from . import core as _core, augment as _augment, imagenet as _imagenet, seg as _seg

__all__ = [*_core.__all__, *_augment.__all__, *_imagenet.__all__, *_seg.__all__]
