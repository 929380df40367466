"""Model folders whose weights are stored in a weight format (written by `offbatch convert` and by
`offbatch import-gguf` keeping a GGUF's quantized blocks).

Such a folder is a model folder like any other, with two differences:
- config.json carries `"quantization_config": {"quant_method": "offbatch", "format": NAME, ...}` (NAME a
  weight format of offbatch/formats; the other keys only describe where the folder came from);
- every tensor the format compresses is stored as the tensors the format stores for it, each under the
  checkpoint name of the logical tensor plus the stored tensor's suffix: `model.layers.0.mlp.up_proj.weight`
  in int4 is `...up_proj.weight.q4` (uint8) and `...up_proj.weight.scale` (float16), with exactly the
  shapes and dtypes the format's `stored` gives for the logical shape config.json implies. Tensors the
  format keeps dense are stored under their own names, in any float dtype.

So the bytes a format streams are the bytes in the files: the weight store copies them (or the disk tier
reads them) without decoding and encoding again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offbatch.errors import ModelFolderError
from offbatch.formats import DENSE, WeightFormat, format_names, get_format
from offbatch.models.catalogue import local_name, module_of
from offbatch.models.names import expected_tensors
from offbatch.models.spec import ModelSpec

QUANT_METHOD = "offbatch"


def quantization_config(fmt: WeightFormat, **about) -> dict:
    """config.json's quantization_config for a folder stored in `fmt` (`about`: where it came from)."""
    return {"quant_method": QUANT_METHOD, "format": fmt.name, **about}


def folder_format(config: dict) -> WeightFormat:
    """The format a folder's weights are stored in (dense when config.json has no quantization_config)."""
    qc = config.get("quantization_config")
    if qc is None:
        return DENSE
    if not isinstance(qc, dict):
        raise ModelFolderError("config.json's quantization_config is not an object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        what = "a GPTQ/AWQ/bitsandbytes checkpoint" if method else "unknown"
        raise ModelFolderError(
            f"config.json's quantization_config is for {method!r} ({what}), which offbatch does not read; give the "
            "unquantized model (and `--weights` or `offbatch convert` to compress it), or a folder written by "
            "`offbatch convert`")
    name = qc.get("format")
    try:
        return get_format(name) if isinstance(name, str) else get_format("?")
    except KeyError:
        raise ModelFolderError(f"config.json's quantization_config names the weight format {name!r}, which "
                               f"this offbatch does not know (known: {format_names()})") from None


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a folder in a format holds for a logical tensor."""

    canonical: str  # the logical tensor's canonical name
    suffix: str  # "" for a tensor stored dense; ".q4", ".scale", ... for a format's stored tensors
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: any float dtype (dense)
    logical: tuple[int, ...]  # the logical tensor's shape


def stored_tensors(spec: ModelSpec, fmt: WeightFormat) -> dict[str, StoredTensor]:
    """File tensor name -> what it holds, for every tensor a folder of `spec` stored in `fmt` has."""
    out = {}
    for name, info in expected_tensors(spec).items():
        local = local_name(info.canonical, module_of(info.canonical, spec))
        if not fmt.compresses(local, info.shape):
            out[name] = StoredTensor(info.canonical, "", info.shape, None, info.shape)
            continue
        for stored_local, shape, dtype in fmt.stored(local, info.shape, torch.float32):
            suffix = stored_local[len(local):]
            out[name + suffix] = StoredTensor(info.canonical, suffix, tuple(shape), dtype, info.shape)
    return out
