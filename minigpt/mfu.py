"""Model FLOPs utilisation: the share of the GPU's peak that the training step turns into model arithmetic.

    MFU = flops_per_token × tokens per second / (peak FLOP/s of one GPU × number of GPUs)

`flops_per_token` is the model's own count (`GPT.flops_per_token`: 6 FLOPs per weight and token for forward and
backward, plus attention's scores; PaLM's appendix B, as nanoGPT and llm.c count), so recomputation, padding or
a slow kernel lower the number instead of being counted as work. The peak is the *dense* tensor-core rate for the
dtype the matmuls run in: bfloat16 or float16 under autocast, TF32 for float32 where TF32 matmuls are on (the
trainer turns them on for CUDA), plain FP32 on GPUs without TF32 (before Ampere). Datasheets quote the rates with
2:4 structured sparsity, which training does not use: those are halved here. GeForce cards accumulate float16 and
bfloat16 products in float32 (as torch asks) at half their headline rate: the rates below are those.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    """Dense TFLOP/s of one GPU by the dtype of its matmuls (None: the GPU has no such tensor-core mode)."""

    name: str
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float


# Matched in order on torch.cuda.get_device_name() (case-insensitive regex search): the more specific names first.
# Sources: NVIDIA's datasheets (sparse rates halved) and the GA102 / AD102 whitepapers for the GeForce cards.
PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bB200\b", Peak("B200", 2250.0, 2250.0, 1125.0, 75.0)),
    (r"\bGH200\b", Peak("GH200", 989.4, 989.4, 494.7, 66.9)),
    (r"\bH200\b.*\bNVL\b", Peak("H200 NVL", 835.5, 835.5, 417.5, 60.0)),
    (r"\bH200\b", Peak("H200 SXM", 989.4, 989.4, 494.7, 66.9)),
    (r"\bH100\b.*\bNVL\b", Peak("H100 NVL", 835.5, 835.5, 417.5, 60.0)),
    (r"\bH100\b.*\bPCIe\b", Peak("H100 PCIe", 756.5, 756.5, 378.0, 51.2)),
    (r"\bH100\b", Peak("H100 SXM", 989.4, 989.4, 494.7, 66.9)),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100"
    (r"\bA100\b", Peak("A100", 312.0, 312.0, 156.0, 19.5)),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bA10\b", Peak("A10", 125.0, 125.0, 62.5, 31.2)),  # not A100, not AWS's A10G (another clock)
    (r"\bA30\b", Peak("A30", 165.0, 165.0, 82.0, 10.3)),
    (r"\bA40\b", Peak("A40", 149.7, 149.7, 74.8, 37.4)),
    (r"\bL40S\b", Peak("L40S", 362.05, 362.05, 183.0, 91.6)),
    (r"\bL40\b", Peak("L40", 181.05, 181.05, 90.5, 90.5)),
    (r"\bL4\b", Peak("L4", 121.0, 121.0, 60.0, 30.3)),
    (r"\bRTX A6000\b", Peak("RTX A6000", 154.8, 154.8, 77.4, 38.7)),
    (r"\bRTX 6000 Ada\b", Peak("RTX 6000 Ada", 364.2, 364.2, 182.1, 91.1)),
    (r"\bRTX 4090\b(?! D)", Peak("RTX 4090", 165.2, 165.2, 82.6, 82.6)),
    (r"\bRTX 3090\b(?! Ti)", Peak("RTX 3090", 71.0, 71.0, 35.6, 35.6)),
    (r"\bT4\b", Peak("T4", None, 65.0, None, 8.1)),  # Turing: float16 tensor cores only
    (r"\bV100S\b", Peak("V100S PCIe", None, 130.0, None, 16.4)),
    (r"\bV100\b.*\bPCIE\b", Peak("V100 PCIe", None, 112.0, None, 14.0)),
    (r"\bV100\b", Peak("V100 SXM2", None, 125.0, None, 15.7)),  # "Tesla V100-SXM2-16GB"
)


def find_peak(device_name: str) -> Peak | None:
    """The table's entry for a GPU named as torch.cuda.get_device_name() names it; None if it is not listed."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def dtype_key(amp_dtype: torch.dtype | None, tf32: bool) -> str:
    """Which of a Peak's rates the matmuls run at: autocast's dtype, else TF32 or plain FP32."""
    if amp_dtype is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return "tf32" if tf32 else "fp32"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float, num_gpus: int = 1) -> float:
    """Model FLOPs utilisation as a fraction (0.41, not 41): achieved model FLOP/s over the GPUs' peak."""
    return flops_per_token * tokens_per_sec / (peak_flops * num_gpus)


@dataclass(frozen=True)
class PeakChoice:
    """The peak a run measures itself against (flops None: no MFU), and the sentence that says which or why not."""

    flops: float | None
    reason: str


def choose_peak(device: torch.device, amp_dtype: torch.dtype | None, peak_tflops: float | None = None,
                tf32: bool | None = None) -> PeakChoice:
    """--peak-tflops when given; else the table's dense peak of this CUDA GPU in the run's dtype; else none."""
    if peak_tflops is not None:
        return PeakChoice(peak_tflops * 1e12, f"mfu: against --peak-tflops {peak_tflops:g} per device")
    if device.type != "cuda":
        return PeakChoice(None, f"mfu: not reported on {device.type} (no peak to compare with); give "
                                f"--peak-tflops N (the device's TFLOP/s) to have it")
    name = torch.cuda.get_device_name(device)
    peak = find_peak(name)
    if tf32 is None:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    key = dtype_key(amp_dtype, tf32 and (peak is None or peak.tf32 is not None))  # no TF32 before Ampere
    rate = getattr(peak, key) if peak is not None else None
    if rate is None:
        why = f"{name} is not in minigpt/mfu.py's table" if peak is None else f"the {peak.name} has no {key} rate"
        return PeakChoice(None, f"mfu: not reported: {why}; give --peak-tflops N (its dense {key} TFLOP/s)")
    return PeakChoice(rate * 1e12, f"mfu: against the {peak.name}'s dense {key} peak of {rate:g} TFLOP/s "
                                   f"(from its name {name!r}; --peak-tflops overrides it)")
