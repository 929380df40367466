"""Attention backends (backend.py: the interface and the registry; one file per backend)."""

from offbatch.attention.backend import (ATTENTION_BACKENDS, AttentionBackend, AttentionStep, StepTerms,
                                        attention_names, get_attention, register_attention)
from offbatch.attention.device_kv import DeviceKV
from offbatch.attention.host_kv_cpu import HostKVCPU
from offbatch.attention.host_kv_gpu import HostKVGPU
from offbatch.attention.hgca import HGCA

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionStep", "StepTerms", "attention_names", "get_attention",
           "register_attention", "DeviceKV", "HostKVCPU", "HostKVGPU", "HGCA"]
