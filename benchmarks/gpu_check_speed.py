"""Kernel speed for gpu_check, each figure next to a peer measured in the same process.

Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs, warm-up first),
median of the repeats; inputs are random, never zeros. Ceilings are measured, not taken
from the datasheet: a 1 GiB device-to-device copy (bytes read + written) and an
8192^3 bf16 matmul.

Attention FLOPs are counted the FlashAttention way: 4*B*H*T^2*D forward, halved for
causal, and 2.5x the forward for the backward (so fwd+bwd = 3.5x the forward).
Shapes follow FlashAttention's benchmark: B*T = 16k tokens, H*D = 2048.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time

import torch
import triton.testing
from gpu_check_boot import peer_status
from tritonlm.kernels import attention as attn
from tritonlm.kernels import attention_configs, configs, launch
from tritonlm.kernels import cross_entropy as ce
from tritonlm.kernels import rmsnorm as rms


def bench_ms(fn, grad_to_none=None, warmup=10, rep=40) -> float:
    """Median milliseconds of fn: do_bench on CUDA; on the CPU (the smoke run of this same
    code through the interpreter) a median of three host-timed calls."""
    if torch.cuda.is_available():
        return float(
            triton.testing.do_bench(
                fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"
            )  # fmt: skip
        )
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _device_dtype():
    """bf16 on the GPU; float32 on the CPU, where the interpreter cannot do bf16 dots."""
    cuda = torch.cuda.is_available()
    return ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem_reset() -> int:
    """Empty the cache, reset the peak counter; return the bytes allocated now."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _mem_peak() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def ceilings(quick: bool = False) -> dict:
    device, dtype = _device_dtype()
    n, m = (2**22, 512) if quick else (2**29, 8192)  # 1 GiB of bf16; an m^3 matmul
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    copy_bytes = 2 * n * src.element_size()  # read + write
    src = dst = None  # free the 2 GiB before the matmul
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    ms_mm = bench_ms(lambda: a @ b, rep=100)
    return {
        "copy_GBps": copy_bytes / (ms * 1e-3) / 1e9,
        "matmul_bf16_tflops": 2 * m**3 / (ms_mm * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_shape": [m, m, m],
        "dtype": str(dtype),
    }


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def tiles_in_use(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The table our attention launches read and the tiles it gives at this head dim
    (after `--autotune`, the freshly tuned table)."""
    cfg = attention_configs.attention_config(D, dtype, arch=launch.arch(device))
    tiles = {k: list(dataclasses.astuple(getattr(cfg, k))) for k in ("fwd", "dkdv", "dq")}
    return {"kernel_table": str(configs.table_path()), "tiles": tiles}


def attention_speed(T: int, D: int, quick: bool = False, group: int = 1) -> dict:
    """Our causal attention vs SDPA's backends, bf16, fwd, bwd and fwd+bwd, TFLOP/s.
    `group` > 1: grouped-query attention, our k/v with H / group heads; SDPA gets them
    already expanded to H heads (the expansion is not timed)."""
    from torch.nn.attention import sdpa_kernel

    device, dtype = _device_dtype()
    B, H = (1, 2) if quick else (max(1, 16384 // T), 2048 // D)
    g = torch.Generator(device=device).manual_seed(T * 1000 + D)
    q, do = (torch.randn(B, H, T, D, device=device, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, H // group, T, D, device=device, generator=g).to(dtype)
            for _ in range(2))  # fmt: skip
    kx, vx = (t.repeat_interleave(group, dim=1).requires_grad_() for t in (k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fwd_flops = 4 * B * H * T * T * D / 2  # causal half
    impls = {"ours": lambda: attn.attention_triton(q, k, v)}

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)

    rec = {"B": B, "H": H, "T": T, "D": D, "group": group, **tiles_in_use(D, dtype, q.device)}
    for name, fn in [("ours", impls["ours"])] + [(f"sdpa_{n}", b) for n, b in _sdpa_backends()]:
        try:
            if name == "ours":
                ctx = _null()
                run = fn
            else:
                ctx = sdpa_kernel([fn])
                run = sdpa
            with ctx:
                run().backward(do)  # raises here if the backend cannot take the shape
                fwd = bench_ms(lambda run=run: run())
                both = bench_ms(lambda run=run: run().backward(do),
                                grad_to_none=[q, k, v, kx, vx])  # fmt: skip
            bwd = max(both - fwd, 1e-9)  # the backward alone, as fwd+bwd minus fwd
            rec[name] = {
                "fwd_ms": fwd,
                "bwd_ms": bwd,
                "fwd_bwd_ms": both,
                "fwd_tflops": fwd_flops / (fwd * 1e-3) / 1e12,
                "bwd_tflops": 2.5 * fwd_flops / (bwd * 1e-3) / 1e12,
                "fwd_bwd_tflops": 3.5 * fwd_flops / (both * 1e-3) / 1e12,
            }
        except Exception as e:  # a backend that does not support this shape/card
            rec[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    peers = [v for n, v in rec.items() if n.startswith("sdpa_") and "fwd_bwd_tflops" in v]
    if peers and "fwd_bwd_tflops" in rec["ours"]:
        best = max(p["fwd_bwd_tflops"] for p in peers)
        rec["best_sdpa_fwd_bwd_tflops"] = best
        rec["ours_vs_best_sdpa"] = rec["ours"]["fwd_bwd_tflops"] / best
    return rec


def packed_document_ids(B: int, T: int, mean_len: int, seed: int) -> torch.Tensor:
    """[B, T] document ids of rows packed with documents of random lengths (uniform in
    [1, 2 * mean_len)), the last one cut at the row's end."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lens, total = [], 0
        while total < T:
            n = int(torch.randint(1, 2 * mean_len, (1,), generator=g))
            lens.append(min(n, T - total))
            total += lens[-1]
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(rows).to(torch.int32)


def attention_packed_speed(T: int, D: int, mean_len: int, quick: bool = False) -> dict:
    """Packed rows (documents averaging `mean_len` tokens): our document-masked kernel vs
    SDPA with the same block-diagonal causal mask (as a boolean mask: the backends that
    take one) and vs our unmasked causal kernel on the same shape. TFLOP/s count the
    useful work only (each document's causal attention), so they compare directly."""
    from torch.nn.attention import sdpa_kernel

    device, dtype = _device_dtype()
    B, H = (1, 2) if quick else (max(1, 16384 // T), 2048 // D)
    g = torch.Generator(device=device).manual_seed(T * 1000 + D + 7)
    q, k, v, do = (
        torch.randn(B, H, T, D, device=device, generator=g).to(dtype).requires_grad_(i < 3)
        for i in range(4)
    )
    ids = packed_document_ids(B, T, mean_len, seed=T + D).to(device)
    lens = [n for r in ids.cpu() for n in r.unique_consecutive(return_counts=True)[1].tolist()]
    useful = float(sum(4 * H * D * n * (n + 1) / 2 for n in lens))  # causal, per document
    pos = torch.arange(T, device=device)
    start, _ = attn.document_bounds(ids)
    mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= start[:, :, None])
    mask = mask[:, None]  # [B, 1, T, T]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    impls = [
        ("ours_packed", _null, lambda: attn.attention_triton(q, k, v, document_ids=ids)),
        ("ours_unmasked", _null, lambda: attn.attention_triton(q, k, v)),
    ]
    impls += [(f"sdpa_{n}", lambda b=b: sdpa_kernel([b]), sdpa) for n, b in _sdpa_backends()]
    rec = {
        "B": B,
        "H": H,
        "T": T,
        "D": D,
        "mean_doc_len": mean_len,
        "documents": int(ids.max(dim=1).values.add(1).sum()),
        "useful_flops": useful,
    }
    for name, ctx, run in impls:
        try:
            with ctx():
                run().backward(do)  # raises here if the backend cannot take the mask
                both = bench_ms(lambda run=run: run().backward(do), grad_to_none=[q, k, v])
            rec[name] = {"fwd_bwd_ms": both, "fwd_bwd_tflops": 3.5 * useful / (both * 1e-3) / 1e12}
        except Exception as e:  # a backend that does not take this mask/shape/card
            rec[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    peers = [
        v["fwd_bwd_tflops"]
        for n, v in rec.items()
        if n.startswith("sdpa_") and isinstance(v, dict) and "fwd_bwd_tflops" in v
    ]
    if peers and "fwd_bwd_tflops" in rec["ours_packed"]:
        rec["best_sdpa_masked_fwd_bwd_tflops"] = max(peers)
        rec["packed_vs_best_sdpa"] = rec["ours_packed"]["fwd_bwd_tflops"] / max(peers)
    if "fwd_bwd_ms" in rec["ours_packed"] and "fwd_bwd_ms" in rec["ours_unmasked"]:
        rec["packed_speedup_vs_unmasked"] = (
            rec["ours_unmasked"]["fwd_bwd_ms"] / rec["ours_packed"]["fwd_bwd_ms"]
        )
    return rec


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def rmsnorm_speed(N: int, d: int, copy_GBps: float | None, compiled: bool) -> dict:
    """fwd+bwd GB/s over the fewest bytes (5 N*d elements) vs the copy rate and peers."""
    device, dtype = _device_dtype()
    g = torch.Generator(device=device).manual_seed(d)
    x = torch.randn(N, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, device=device, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(N, d, device=device, generator=g).to(dtype)
    # the fewest bytes: forward reads x, writes y; backward reads x and dy, writes dx
    nbytes = 5 * N * d * x.element_size()
    impls = {
        "ours": lambda a, b: rms.rms_norm_triton(a, b, 1e-6),
        "torch_eager": lambda a, b: rms.rms_norm_reference(a, b, 1e-6),
    }
    if compiled:
        impls["torch_compile"] = torch.compile(
            lambda a, b: rms.rms_norm_reference(a, b, 1e-6), dynamic=False
        )
    liger = _liger_rmsnorm()
    if liger is not None:
        impls["liger"] = liger
    rec = {"N": N, "d": d, "min_bytes": nbytes}
    for name, fn in impls.items():
        fn(x, w).backward(dy)  # compile / autotune outside the timing
        ms = bench_ms(lambda fn=fn: fn(x, w).backward(dy), grad_to_none=[x, w])
        gbps = nbytes / (ms * 1e-3) / 1e9
        rec[name] = {"fwd_bwd_ms": ms, "GBps": gbps}
        if copy_GBps:
            rec[name]["frac_of_copy"] = gbps / copy_GBps
    return rec


def _liger_rmsnorm():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # pragma: no cover

    return lambda a, b: LigerRMSNormFunction.apply(a, b, 1e-6)  # pragma: no cover


def _liger_linear_ce():
    """Liger-Kernel's fused linear cross-entropy (its functional API), or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.functional import (  # pragma: no cover
        liger_fused_linear_cross_entropy,
    )

    def run(h, w, t):  # pragma: no cover
        out = liger_fused_linear_cross_entropy(h, w, t, ignore_index=-100)
        return out[0] if isinstance(out, tuple) else out

    return run


def linear_ce_speed(N: int, d: int, V: int) -> dict:
    """Fused linear cross-entropy vs eager (logits materialized): peak memory and time."""
    device, dtype = _device_dtype()
    g = torch.Generator(device=device).manual_seed(V)
    h = torch.randn(N, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, device=device, generator=g) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    impls = {
        "ours": lambda: ce.linear_cross_entropy_triton(h, w, t, -100),
        "eager": lambda: ce.linear_cross_entropy_reference(h, w, t, -100),
    }
    liger = _liger_linear_ce() if torch.cuda.is_available() else None
    if liger is not None:
        impls["liger"] = lambda: liger(h, w, t)  # pragma: no cover
    rows = ce.default_chunk_rows(N, V, dtype, torch.device(device))
    rec = {"N": N, "d": d, "V": V, "chunk_rows": rows}
    for name, fn in impls.items():
        fn().backward()  # warm-up (compile) before measuring memory
        h.grad = w.grad = None
        base = _mem_reset()
        fn().backward()
        peak = _mem_peak() - base
        h.grad = w.grad = None
        ms = bench_ms(lambda fn=fn: fn().backward(), grad_to_none=[h, w])
        rec[name] = {"fwd_bwd_ms": ms, "peak_extra_gib": peak / 2**30}
    eager_peak = rec["eager"]["peak_extra_gib"]
    rec["mem_ratio"] = rec["ours"]["peak_extra_gib"] / eager_peak if eager_peak else None
    rec["time_ratio"] = rec["ours"]["fwd_bwd_ms"] / rec["eager"]["fwd_bwd_ms"]
    if "liger" in rec:  # pragma: no cover - needs the wheel and a GPU
        rec["time_ratio_vs_liger"] = rec["ours"]["fwd_bwd_ms"] / rec["liger"]["fwd_bwd_ms"]
    return rec


def optional_peers() -> dict:
    """Which optional peers this machine has (nothing is installed by the script)."""
    has_tut = importlib.util.find_spec("triton.tutorials") is not None
    return {
        "liger_kernel": peer_status("liger_kernel", "liger_kernel"),
        "triton_tutorial_attention": "present (not wired)"
        if has_tut
        else ("skipped: the triton wheel ships no tutorials package"),
    }
