"""Numeric precision: what ``--precision auto`` means, and the autocast context of each choice.

One copy for the train and localize jobs. ``auto`` is resolved once, by the job's driver,
for the device its workers use: bf16 on CUDA, and on CPUs with native bf16 instructions
(AVX512-BF16 or AMX); fp32 elsewhere. Without native bf16, autocast emulates it and runs
several times slower than fp32 (README, "Precision"), so fp32 is the right choice there.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")  # what autocast runs
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what a job's --precision takes
# /proc/cpuinfo flags of the x86 bf16 instructions oneDNN uses for bf16 matmuls.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This machine's CPU flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels run at ("AVX512", "AVX2", "DEFAULT", ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def native_bf16_cpu(flags: set[str] | None = None, capability: str | None = None) -> bool:
    """Whether bf16 runs natively on this CPU: an AVX512-BF16 or AMX-BF16 flag, *and* torch
    running its AVX-512 kernels (with ``ATEN_CPU_CAPABILITY=avx2`` the elementwise bf16 ops
    fall back to emulation even on such a CPU). Arguments are injectable for tests."""
    flags = cpu_flags() if flags is None else flags
    capability = cpu_capability() if capability is None else capability
    return bool(flags & set(NATIVE_BF16_FLAGS)) and capability.upper().startswith("AVX512")


def resolve_precision(requested: str, device_type: str, *, native_bf16: bool | None = None) -> str:
    """``auto`` -> "bf16" on CUDA or a native-bf16 CPU, else "fp32"; other choices unchanged.

    ``native_bf16`` overrides the CPU probe (tests).
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16"
    if device_type == "cpu":
        return "bf16" if (native_bf16_cpu() if native_bf16 is None else native_bf16) else "fp32"
    return "fp32"


def autocast_for(precision: str, device: torch.device):
    """The autocast context for a resolved ``precision``; fp16 needs CUDA."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(
                "--precision fp16 needs a CUDA GPU and this runs on CPU: "
                "use --precision bf16 (or fp32) on CPU, or give the job GPUs"
            )
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} once resolved, got {precision!r}")
