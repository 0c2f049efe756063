"""AdamW with its state in host memory: the idea behind QLoRA's paged optimizers, in the open.

AdamW (Loshchilov and Hutter, 2019) keeps two float32 moments per trained parameter, 8 bytes, on
top of the 4-byte weight and its 4-byte gradient. QLoRA's third ingredient, paged optimizers,
keeps that state out of the GPU's way: bitsandbytes allocates it in CUDA unified memory
(`cudaMallocManaged`), which the driver moves to host memory page by page only when the GPU runs
out, and prefetches back before each step. Only tensors of at least 1e5 elements get such memory;
smaller ones stay on the GPU. Nothing pages while the GPU has room, so it saves memory exactly
when a memory spike would have ended the run.

`OffloadedAdamW` does the same job deliberately and visibly: the moments always live in host
memory (pinned when a GPU is present, so copies run at full speed), and each parameter's
moments visit the parameter's device only for its own update:

    m = b1 m + (1 - b1) g                 first moment
    v = b2 v + (1 - b2) g^2               second moment
    p = p - lr wd p                       decoupled weight decay
    p = p - lr m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

so the device holds one parameter's state at a time instead of all of it. The price is the
traffic: 16 bytes per parameter per step (8 there, 8 back), counted in `bytes_moved`. For LoRA's
few million parameters that is milliseconds over PCIe; for full fine-tuning of 7B parameters
(112 GB per step) it would be the whole step. On a CPU, host and device are one memory: nothing
moves, and the result is plain AdamW's, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in host memory; equal to `torch.optim.AdamW(foreach=False)`.

    Trainable parameters must be float32 (minipeft's adapters are). `bytes_moved` counts bytes
    copied between host and device in all steps so far; `largest_device_state_bytes` is the most
    optimizer state that was on a device at once (one parameter's moments)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, pin_memory: bool | None = None) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"OffloadedAdamW: lr, eps and weight_decay must be >= 0, got lr={lr},"
                             f" eps={eps}, weight_decay={weight_decay}.")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"OffloadedAdamW: betas must be in [0, 1), got {betas}.")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.bytes_moved = 0
        self.largest_device_state_bytes = 0
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """As torch's (the constructor calls it too), for float32 parameters only."""
        params = param_group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if p.dtype != torch.float32:
                raise ValueError(f"OffloadedAdamW updates float32 parameters, got one of "
                                 f"{p.dtype} with shape {tuple(p.shape)}: keep trainable "
                                 "parameters in float32 (minipeft's adapters are), or use "
                                 "torch.optim.AdamW.")
        super().add_param_group(param_group)

    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, pin_memory=self.pin_memory)

    def _visit(self, moment: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The moment on `device` (the host copy itself when the device is the host)."""
        if device.type == "cpu":
            return moment
        self.bytes_moved += moment.nbytes
        return moment.to(device, non_blocking=self.pin_memory)

    def _return(self, host: torch.Tensor, visiting: torch.Tensor) -> None:
        if visiting is not host:
            host.copy_(visiting)                  # blocking: the next step may reuse the memory
            self.bytes_moved += host.nbytes

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, which puts the moments on each parameter's device: back to the host. A
        step count saved by torch's AdamW (a tensor) becomes an int again, as this one keeps it,
        so that the bias corrections are computed as before."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "step" in state:
                state["step"] = int(state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and (state[key].device.type != "cpu"
                                     or state[key].is_pinned() != self.pin_memory):
                    host = torch.empty(state[key].shape, pin_memory=self.pin_memory)
                    state[key] = host.copy_(state[key])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=self._host_zeros(p),
                                 exp_avg_sq=self._host_zeros(p))
                state["step"] += 1
                t = state["step"]
                m = self._visit(state["exp_avg"], p.device)
                v = self._visit(state["exp_avg_sq"], p.device)
                if p.device.type != "cpu":
                    self.largest_device_state_bytes = max(self.largest_device_state_bytes,
                                                          m.nbytes + v.nbytes)
                g = p.grad
                p.mul_(1 - lr * group["weight_decay"])                  # decoupled decay
                m.lerp_(g, 1 - beta1)                                   # m = b1 m + (1-b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)           # v = b2 v + (1-b2) g^2
                denominator = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denominator, value=-lr / (1 - beta1 ** t))
                self._return(state["exp_avg"], m)
                self._return(state["exp_avg_sq"], v)
        return loss
