"""model/precision.py: what --precision auto resolves to, and the autocast of each choice."""
from __future__ import annotations

import pytest
import torch

from model import precision
from model.precision import autocast_for, native_bf16_cpu, resolve_precision

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
COOPER_LAKE = {"avx2", "avx512f", "avx512_bf16"}
SKYLAKE_X = {"avx2", "avx512f", "avx512bw"}  # AVX-512 without bf16: autocast emulates it
AVX2_ONLY = {"avx", "avx2", "fma"}


@pytest.mark.parametrize("flags,capability,native", [
    (SAPPHIRE_RAPIDS, "AVX512", True),
    (COOPER_LAKE, "AVX512", True),
    ({"amx_bf16"}, "AVX512", True),
    (SKYLAKE_X, "AVX512", False),
    (AVX2_ONLY, "AVX2", False),
    (set(), "DEFAULT", False),  # no /proc/cpuinfo (macOS) or an unknown CPU
    (SAPPHIRE_RAPIDS, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2: torch's bf16 kernels emulate
    (SAPPHIRE_RAPIDS, "DEFAULT", False),
])
def test_native_bf16_needs_the_flag_and_torch_on_avx512(flags, capability, native):
    assert native_bf16_cpu(flags, capability) is native


@pytest.mark.parametrize("device,native,expected", [
    ("cuda", False, "bf16"),
    ("cuda", True, "bf16"),
    ("cpu", True, "bf16"),
    ("cpu", False, "fp32"),
    ("mps", True, "fp32"),
])
def test_auto_is_bf16_on_cuda_and_native_bf16_cpus_only(device, native, expected):
    assert resolve_precision("auto", device, native_bf16=native) == expected


def test_auto_on_cpu_reads_this_machines_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(COOPER_LAKE))
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX512")
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(AVX2_ONLY))
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    assert resolve_precision("auto", "cpu") == "fp32"


def test_explicit_choices_pass_through_and_unknown_ones_fail():
    for choice in ("fp32", "bf16", "fp16"):
        assert resolve_precision(choice, "cpu", native_bf16=False) == choice
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_cpu_flags_of_this_machine_are_a_set_of_words():
    flags = precision.cpu_flags()
    assert isinstance(flags, set) and all(isinstance(f, str) and " " not in f for f in flags)


def test_autocast_for_each_precision():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with autocast_for("fp32", cpu):
        assert (a @ b).dtype == torch.float32
    with autocast_for("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        autocast_for("fp16", cpu)
    with pytest.raises(ValueError, match="once resolved, got 'auto'"):
        autocast_for("auto", cpu)
