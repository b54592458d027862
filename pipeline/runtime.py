"""Where and how a stage computes: the device, the torchrun process group, autocast and CPU threads.

Every stage that runs a model (teach, audit, student, finetune-teacher, evaluate) and the benchmarks set
these up here, so `--device auto` or a torchrun launch means the same thing in each of them.
"""

import os
from contextlib import nullcontext

import torch

from pipeline.errors import UserError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (`--threads`); None keeps torch's choice (all cores)."""
    if threads:
        torch.set_num_threads(threads)


def resolve_device(device: str = "auto") -> torch.device:
    """`--device` (auto, cpu, cuda, cuda:N) as a torch device; under torchrun, cuda is this rank's GPU."""
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"--device '{device}' is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for but no CUDA device is visible; use --device cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(device)


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether the group was created here) from torchrun's environment; one process
    without torchrun is rank 0 of 1. gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def mean_across_ranks(values: dict, world: int, device) -> dict:
    """The mean of each float value over all ranks (every rank gets the result)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def close_distributed(own_group: bool) -> None:
    """Destroy the process group if `init_distributed` created it (a caller's own group stays)."""
    if own_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of `--amp` (none, bf16, fp16)."""
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp '{amp}' is not one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def student_amp(device: torch.device) -> torch.dtype | None:
    """Students train and validate in bf16 autocast on CUDA and in float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on `device` in `dtype`, or no autocast when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class Normalize:
    """uint8 images [B, 3, H, W] -> float32 (x - 255 mean) / (255 std) on `device`: the one normalisation of
    rendered views, for the teacher (on its device) and the student loader alike. One float copy, then in
    place (no temporaries)."""

    def __init__(self, mean, std, device="cpu"):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255

    @classmethod
    def of(cls, pre, device="cpu") -> "Normalize":
        """The normalisation of a model's pipeline.preprocess.Preprocess."""
        return cls(pre.mean, pre.std, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Any memory layout in (the loaders give channels-last uint8 views), contiguous NCHW float out."""
        images = images.to(self.device, non_blocking=True)
        out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
        return out.copy_(images).sub_(self.mean).div_(self.std)
