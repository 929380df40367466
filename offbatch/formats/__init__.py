"""Weight formats (base.py: the interface, the packing rule and the registry; one file per format)."""

from offbatch.formats.base import FORMATS, Item, Layout, ModuleWeights, WeightFormat, get_format, pack, register_format
from offbatch.formats.dense import DENSE

__all__ = ["DENSE", "FORMATS", "Item", "Layout", "ModuleWeights", "WeightFormat", "get_format", "pack", "register_format"]
