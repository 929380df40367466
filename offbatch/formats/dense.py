"""The dense format: every tensor stored as it is computed with, in the compute dtype (bf16, fp16 or
fp32); `linear` is F.linear."""

from __future__ import annotations

from offbatch.formats.base import WeightFormat, register_format


class DenseFormat(WeightFormat):
    name = "dense"


DENSE = register_format(DenseFormat())
