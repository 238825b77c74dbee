"""DeviceProfile: what hardware the engine runs on, probed once at engine start."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

from studio.units import GiB, ram_info


@dataclass
class DeviceProfile:
    kind: str  # "cuda", "rocm", "mps", "xpu", "cpu"
    name: str
    torch_device: str  # what torch.device() takes: "cuda:0", "mps", "cpu"
    total_vram: int = 0  # bytes; 0 on CPU
    free_vram: int = 0
    total_ram: int = 0
    free_ram: int = 0
    threads: int = 1
    bf16: bool = False
    fp16: bool = False
    fp8: bool = False
    capability: str = ""
    torch_version: str = ""
    torch_build: str = ""
    vram_budget: int = 0  # bytes the engine may use on the device; 0 = no cap
    extra: dict = field(default_factory=dict)

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm", "mps", "xpu")

    def label(self) -> str:
        """Short text for the status bar, e.g. 'CUDA · NVIDIA RTX 4090 · 24 GiB'."""
        if self.kind == "cpu":
            text = f"CPU · {self.threads} thread{'' if self.threads == 1 else 's'}"
            every = int(self.extra.get("all_threads") or self.threads)
            # image and video jobs use every core; chat keeps fewer (worker_threads says why)
            return f"CPU · {every} threads (chat {self.threads})" if every != self.threads else text
        size = f" · {self.total_vram / GiB:.0f} GiB" if self.total_vram else ""
        return f"{self.kind.upper()} · {self.name}{size}"

    def compute_dtype(self) -> str:
        """The dtype a model runs in by default on this device."""
        if self.kind == "cpu":
            return "float32"
        return "bfloat16" if self.bf16 else "float16"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.label()
        return d


def worker_threads(threads: int, cores: int) -> int:
    """Intra-op threads for the engine's worker, from torch's default (`threads`) and the core count.

    The engine's OpenMP threads sleep between ops (OMP_WAIT_POLICY=PASSIVE, which keeps decode usable
    on a busy machine), so each op wakes the others. On 2-3 cores that costs more than the extra core
    gives, and one core is left to the window and the OS. SmolLM2 on a 2-core CPU, one thread against
    two: 68-77 against 51-57 tok/s idle, 75-79 against 63-69 beside a process using 40% of a core.
    Rechecked 2026-12-05 with the CPU GGUF kernel (docs/PERFORMANCE.md): decode 31-36 tok/s on one
    thread, 32-37 on two (load average 1.5), 39 against 30 passive and 40 against 0.8 spinning beside
    other work (load average 4); only the prompt gains from the second thread (+50% when idle).
    """
    return max(1, threads - 1 if 2 <= cores <= 3 else threads)


ALL_CORE_KINDS = ("image", "video")  # compute-bound steps: every core shortens them


def job_threads(kind: str, chat_threads: int, all_threads: int) -> int:
    """Intra-op threads for one job. Diffusion steps are large compute-bound matmuls that scale with cores
    (the wake-up cost above is noise beside a step of seconds); chat decode keeps `worker_threads`' rule."""
    return max(1, all_threads if kind in ALL_CORE_KINDS else chat_threads)


def probe(override: str = "auto", vram_budget: int = 0, reserve: int = 0) -> DeviceProfile:
    """Probe the best device (or the one named by `override`: auto, cuda, cuda:1, mps, xpu, cpu)."""
    import torch

    total_ram, free_ram = ram_info()
    common = dict(
        total_ram=total_ram,
        free_ram=free_ram,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        torch_build=_torch_build(torch),
    )
    want = override.lower()
    if want in ("auto", "cuda") or want.startswith("cuda:"):
        if torch.cuda.is_available():
            index = int(want.split(":")[1]) if ":" in want else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"no CUDA device {index}: {torch.cuda.device_count()} found")
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            rocm = getattr(torch.version, "hip", None) is not None
            major, minor = props.major, props.minor
            budget = vram_budget or max(0, total - reserve)
            return DeviceProfile(
                kind="rocm" if rocm else "cuda",
                name=props.name,
                torch_device=f"cuda:{index}",
                total_vram=total,
                free_vram=free,
                bf16=torch.cuda.is_bf16_supported(),
                fp16=True,
                fp8=(not rocm) and (major, minor) >= (8, 9),
                capability=f"{major}.{minor}",
                vram_budget=min(budget, total),
                **common,
            )
        if want != "auto":
            raise ValueError("CUDA was asked for but torch sees no CUDA device; pick 'auto' or 'cpu' in Settings")
    if want in ("auto", "mps"):
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return DeviceProfile(kind="mps", name="Apple GPU", torch_device="mps", total_vram=total_ram,
                                 free_vram=free_ram, bf16=True, fp16=True, vram_budget=vram_budget, **common)
        if want == "mps":
            raise ValueError("MPS was asked for but is not available on this machine")
    if want in ("auto", "xpu"):
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            props = xpu.get_device_properties(0)
            total = getattr(props, "total_memory", 0)
            return DeviceProfile(kind="xpu", name=props.name, torch_device="xpu:0", total_vram=total,
                                 free_vram=total, bf16=True, fp16=True, vram_budget=vram_budget or total, **common)
        if want == "xpu":
            raise ValueError("XPU was asked for but is not available on this machine")
    if want not in ("auto", "cpu", "cuda", "mps", "xpu") and not want.startswith("cuda:"):
        raise ValueError(f"unknown device {override!r}: use auto, cuda, cuda:N, mps, xpu or cpu")
    return DeviceProfile(kind="cpu", name=platform.processor() or platform.machine(), torch_device="cpu",
                         bf16=True, fp16=False, vram_budget=0, **common)


def _torch_build(torch) -> str:
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU"
