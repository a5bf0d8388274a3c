"""Section `attention`: every backend of `attention_with_lse` that can run on the device, against a float32 reference.

The reference ([`reference_attention`]) upcasts the very inputs the kernel gets (already rounded to the dtype under
test) to float32 and computes the output with PyTorch's `scaled_dot_product_attention` forced onto its math kernel (so
it shares no code with the kernels under test) and the log-sum-exp (LSE) as `torch.logsumexp` of the float32 scores.
The error of a kernel is thus its own, not the dtype's rounding of the inputs. Each (backend, dtype, mask, shape) is
a row: max |error| of the output and of the LSE against per-dtype tolerances ([`TOLERANCES`]), and the median time
of a few calls. A combination a kernel does not take (e.g. `_native_efficient` on the CPU, a mask on `_native_flash`
on CUDA, `flash` without the flash-attn package) is skipped with the reason; any other exception fails the row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import ATTENTION_BACKENDS, attention_with_lse
from .context import DoctorContext, describe, median, time_call
from .environment import flash_attn_status
from .settings import DTYPES


# dtype -> largest accepted max |error| of (output, LSE). The output comes back rounded to the input dtype (bf16 keeps
# 8 bits: ~4e-3 at |out| ~ 1) and half-precision kernels multiply the probabilities by V in that dtype; every kernel
# accumulates the scores and the LSE in float32. Measured on CPU (4 heads x 32, Sq = Sk = 1027): bf16 1.3e-3 / 1.6e-5,
# fp16 1.4e-4 / 1.5e-5, fp32 6e-7 / 1e-6.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "bfloat16": (2e-2, 1e-3),
    "float16": (5e-3, 1e-3),
}


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """Full float32 matmuls inside the block (no TF32 on Ampere and newer), whatever the process set."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The float32 reference of `attention_with_lse`: output `(B, Sq, H, D)` and LSE `(B, H, Sq)`, both float32.

    The output is `torch.nn.functional.scaled_dot_product_attention` on the inputs upcast to float32, on its math
    kernel; the LSE is `torch.logsumexp` of the float32 scores `q . k * scale` (masked keys at `-inf`). Rows whose
    keys are all masked are not defined here (the output would be NaN); the check never builds them.

    Args:
        query, key, value (`torch.Tensor`): `(B, Sq, H, D)`, `(B, Sk, H, D)`, `(B, Sk, H, D)`.
        key_mask (`torch.Tensor`, *optional*): `(B, Sk)` bool, `True` for keys to attend to.
        scale (`float`, *optional*): defaults to `D ** -0.5`.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    # (B, S, H, D) -> (B, H, S, D), float32
    q, k, v = (tensor.float().transpose(1, 2) for tensor in (query, key, value))
    mask = None if key_mask is None else key_mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
    with _ieee_float32(), sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, Sq, D)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, D) x (B, H, D, Sk) -> (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, 1, 1, Sk) broadcast over heads and queries
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    return out.transpose(1, 2), lse  # (B, H, Sq, D) -> (B, Sq, H, D)


def unsupported_reason(backend: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str | None:
    r"""Why `backend` cannot run this combination here (a documented limit of the kernel), or `None` if it can."""
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "_native_efficient" and device.type != "cuda":
        return "CUDA-only kernel (aten._scaled_dot_product_efficient_attention)"
    if backend == "flash":
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
        status = flash_attn_status()
        if not status["available"]:
            return f"flash-attn not importable ({status['reason']})"
        if masked:
            return "flash-attn takes no key mask"
        if not half:
            return "flash-attn takes fp16/bf16 only"
    if backend == "_native_flash" and device.type == "cuda":
        if masked:
            return "aten._scaled_dot_product_flash_attention takes no mask on CUDA"
        if not half:
            return "the CUDA flash kernel takes fp16/bf16 only"
        if not torch.backends.cuda.is_flash_attention_available():
            return "this PyTorch build has no CUDA flash attention"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "the CUDA flash kernel needs compute capability >= 8.0"
    return None


def _problem(
    batch: int, seq_q: int, seq_k: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, length, heads, head_dim, generator=generator).to(device, dtype)
        for length in (seq_q, seq_k, seq_k)
    )
    # Every batch row keeps most keys; the last one loses a block in the middle (the mask need not be a suffix: the
    # joint attention masks [text padding, image] keys).
    mask = torch.ones(batch, seq_k, dtype=torch.bool)
    mask[-1, seq_k // 4 : seq_k // 2] = False
    return {"query": q, "key": k, "value": v, "mask": mask.to(device)}


def _max_abs(value: torch.Tensor, reference: torch.Tensor) -> float:
    error = (value.float() - reference).abs().max().item()
    return error if math.isfinite(error) else math.inf


def _check_row(
    backend: str, problem: dict[str, torch.Tensor], mask: torch.Tensor | None, reference: tuple[torch.Tensor, ...],
    dtype_name: str, repeats: int, device: torch.device,
) -> dict[str, Any]:
    out_tol, lse_tol = TOLERANCES[dtype_name]
    row: dict[str, Any] = {"out_tolerance": out_tol, "lse_tolerance": lse_tol}

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        return attention_with_lse(problem["query"], problem["key"], problem["value"], key_mask=mask, backend=backend)

    try:
        (out, lse), _ = time_call(call, device)  # warm-up: kernel selection, first allocation
        times = [time_call(call, device)[1] for _ in range(repeats)]
    except Exception as error:  # noqa: BLE001 - a kernel that should run and raises fails its row, not the run
        return {**row, "status": "fail", "reason": describe(error)}
    row["out_max_abs_err"] = _max_abs(out, reference[0])
    row["lse_max_abs_err"] = _max_abs(lse, reference[1])
    row["time_s"] = median(times)
    good = row["out_max_abs_err"] <= out_tol and row["lse_max_abs_err"] <= lse_tol
    row["status"] = "pass" if good else "fail"
    if not good:
        row["reason"] = "error above tolerance"
    return row


def check_attention(context: DoctorContext) -> dict[str, Any]:
    r"""The `attention` section: a row per (backend, dtype, key mask, shape); see the module docstring."""
    settings, device = context.settings, context.device
    rows: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for dtype_name in settings.attention_dtypes:
        dtype = getattr(torch, dtype_name)
        for seq_q, seq_k in settings.attention_shapes:
            problem = _problem(settings.attention_batch, seq_q, seq_k, settings.attention_heads,
                               settings.attention_head_dim, dtype, device, settings.seed)
            for masked in (False, True):
                where = {"dtype": dtype_name, "masked": masked, "seq_q": seq_q, "seq_k": seq_k}
                if context.budget.spent():
                    rows += [{"backend": b, **where, "status": "skipped", "reason": context.budget.reason}
                             for b in ATTENTION_BACKENDS]
                    continue
                mask = problem["mask"] if masked else None
                reference = reference_attention(problem["query"], problem["key"], problem["value"], mask)
                # PyTorch's own SDPA on the same inputs and dtype (default kernel choice), for scale.
                sdpa_mask = None if mask is None else mask[:, None, None, :]
                q, k, v = (problem[name].transpose(1, 2) for name in ("query", "key", "value"))
                case: dict[str, Any] = dict(where)
                try:
                    sdpa_times = [time_call(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
                                            device)[1] for _ in range(settings.attention_repeats + 1)][1:]
                    case["sdpa_time_s"] = median(sdpa_times)
                except Exception as error:  # noqa: BLE001 - the baseline is informative; its failure is reported
                    case["sdpa_error"] = describe(error)
                cases.append(case)
                for backend in ATTENTION_BACKENDS:
                    reason = unsupported_reason(backend, device, dtype, masked)
                    if reason is not None:
                        rows.append({"backend": backend, **where, "status": "skipped", "reason": reason})
                        continue
                    row = _check_row(backend, problem, mask, reference, dtype_name, settings.attention_repeats,
                                     device)
                    rows.append({"backend": backend, **where, **row})
                del reference
        context.progress(f"doctor: attention {dtype_name} done")
    statuses = [row["status"] for row in rows]
    ran = [row for row in rows if row["status"] != "skipped"]
    verdict = "fail" if "fail" in statuses or not ran else "pass"
    dtypes = {name: "checked" for name in settings.attention_dtypes}
    for name in DTYPES:
        checked = ", ".join(settings.attention_dtypes)
        dtypes.setdefault(name, f"not in the {settings.preset} preset (it checks {checked})")
    return {
        "verdict": verdict,
        "problem": {"batch": settings.attention_batch, "heads": settings.attention_heads,
                    "head_dim": settings.attention_head_dim, "shapes": [list(s) for s in settings.attention_shapes],
                    "mask": "the last batch row masks keys [Sk/4, Sk/2)"},
        "reference": "float32 SDPA (math kernel) for the output, torch.logsumexp of float32 scores for the LSE, on "
                     "the kernel's own (rounded) inputs",
        "tolerances": {name: {"out": tol[0], "lse": tol[1]} for name, tol in TOLERANCES.items()},
        "dtypes": dtypes,
        "counts": {status: statuses.count(status) for status in ("pass", "fail", "skipped")},
        "sdpa": cases,
        "rows": rows,
    }
