"""Weight formats (base.py: the interface, the packing rule and the registry; one file per format:
dense.py, int8.py, int4.py (quantized.py: what they share, computing through offbatch.kernels), bnb4.py:
nf4/fp4 through bitsandbytes; bitmap.py: pruned weights, a bitmap and the kept values; keep.py: some layers kept dense)."""

from offbatch.formats.base import (FORMATS, Item, Layout, ModuleWeights, WeightFormat, format_names, get_format,
                                   known_format, pack, register_family, register_format)
from offbatch.formats.bitmap import BitmapFormat
from offbatch.formats.bnb4 import FP4, NF4, Bnb4Format
from offbatch.formats.dense import DENSE
from offbatch.formats.int4 import INT4, INT4_ASYM, Int4Format
from offbatch.formats.int8 import INT8, Int8Format
from offbatch.formats.keep import KeepDense, keep_name

__all__ = ["BitmapFormat", "Bnb4Format", "DENSE", "FORMATS", "FP4", "INT4", "INT4_ASYM", "INT8", "Int4Format", "Int8Format", "Item",
           "KeepDense", "Layout", "ModuleWeights", "NF4", "WeightFormat", "format_names", "get_format",
           "keep_name", "known_format", "pack", "register_family", "register_format"]
