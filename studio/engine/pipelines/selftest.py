"""Device self-test: a timed matrix multiply on the chosen device.

Proves the whole path (client -> socket -> queue -> worker -> device -> events) and
tells the user whether the GPU is really used and how fast it is.
"""

from __future__ import annotations

import time

from studio.engine.context import JobContext, UserError
from studio.protocol import SelfTestJob, SelfTestResult


def run_selftest(job: SelfTestJob, ctx: JobContext) -> SelfTestResult:
    import torch

    if not 16 <= job.size <= 16384:
        raise UserError("bad_input", f"Self-test size {job.size} is out of range: pick 16 to 16384.")
    if not 1 <= job.iterations <= 10000:
        raise UserError("bad_input", f"Self-test iterations {job.iterations} is out of range: pick 1 to 10000.")
    device = torch.device(ctx.device.torch_device if job.device == "auto" else job.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device", "The self-test asked for CUDA, but this engine has no CUDA device.")
    dtype_name = ctx.device.compute_dtype() if job.dtype == "auto" else job.dtype
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError("bad_input", f"Unknown dtype {job.dtype!r}: use auto, float32, float16 or bfloat16.")

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(job.size, job.size, generator=gen).to(device, dtype)
    b = torch.randn(job.size, job.size, generator=gen).to(device, dtype)
    torch.matmul(a, b)  # warm-up: kernel selection and lazy init are not throughput
    _sync(device)
    start = time.perf_counter()
    for i in range(job.iterations):
        ctx.cancel.check()
        c = torch.matmul(a, b)
        ctx.progress(i + 1, job.iterations, "matmul")
    _sync(device)
    seconds = time.perf_counter() - start
    flops = 2.0 * job.size**3 * job.iterations
    # A correctness check, so a broken driver can't report a great number for garbage.
    ref = (a[:8].float() @ b.float())
    err = (c[:8].float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    return SelfTestResult(
        device=str(device),
        device_label=ctx.device.label(),
        dtype=dtype_name,
        size=job.size,
        iterations=job.iterations,
        seconds=seconds,
        tflops=flops / seconds / 1e12,
        relative_error=err,
        ok=bool(err < tolerance),
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
