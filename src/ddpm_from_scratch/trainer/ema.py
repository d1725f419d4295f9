"""Exponential moving average of the weights (the exported UNet holds it), checkpointed as ``ema.safetensors``."""

import json
import os

import torch

EMA_FILE = "ema.safetensors"


def ema_decay(num_updates: int, max_decay: float = 0.9999, min_decay: float = 0.0, use_warmup: bool = True,
              inv_gamma: float = 1.0, power: float = 0.75, update_after_step: int = 0) -> float:
    """Decay used at update number ``num_updates`` (1-based): warm-up 1 - (1 + n / inv_gamma)^-power
    (Karras-style; n counts updates after ``update_after_step``), or (1 + n) / (10 + n), clamped to
    [min_decay, max_decay]; 0 (copy the weights) before the first counted update."""
    n = num_updates - update_after_step - 1
    if n <= 0:
        return 0.0
    value = 1.0 - (1.0 + n / inv_gamma) ** -power if use_warmup else (1.0 + n) / (10.0 + n)
    return float(min(max(value, min_decay), max_decay))


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in float32 on the model's device.

    ``update(model)`` once per optimizer step: shadow <- decay * shadow + (1 - decay) * param.
    """

    def __init__(self, model: torch.nn.Module, max_decay: float = 0.9999, min_decay: float = 0.0,
                 use_warmup: bool = True, inv_gamma: float = 1.0, power: float = 0.75, update_after_step: int = 0):
        if not 0.0 <= min_decay <= max_decay < 1.0:
            raise ValueError(f"EMA decays must satisfy 0 <= ema_min_decay <= ema_max_decay < 1, "
                             f"got min {min_decay}, max {max_decay}")
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]
        self.hparams = dict(max_decay=max_decay, min_decay=min_decay, use_warmup=use_warmup, inv_gamma=inv_gamma,
                            power=power, update_after_step=update_after_step)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay the next update will use."""
        return ema_decay(self.num_updates + 1, **self.hparams)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step from ``model``'s parameters; returns the decay used."""
        decay = self.current_decay()
        params = [p.detach() for p in model.parameters()]
        if params and params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        else:
            torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Writes the averaged weights into ``model`` (same architecture)."""
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(dtype=p.dtype, device=p.device))

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates, **self.hparams}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(shadow[n])
        self.num_updates = int(state["num_updates"])

    def save(self, path: str) -> None:
        """Shadow weights as safetensors; update count and hyper-parameters in its metadata."""
        from safetensors.torch import save_file

        meta = {"num_updates": str(self.num_updates), "hparams": json.dumps(self.hparams)}
        save_file({n: s.contiguous().cpu() for n, s in zip(self.names, self.shadow)}, path, metadata=meta)

    def load(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            self.load_state_dict({"shadow": {k: f.get_tensor(k) for k in f.keys()},
                                  "num_updates": int(meta.get("num_updates", 0))})


def register_ema(accelerator, ema: EMA):
    """Makes ``accelerator.save_state``/``load_state`` carry the EMA as ``ema.safetensors`` (main writes)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save(os.path.join(output_dir, EMA_FILE))

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, EMA_FILE)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {input_dir} has no {EMA_FILE}; it was saved without --use_ema")
        ema.load(path)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)


def ema_model_copy(unet: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """A detached copy of ``unet`` holding the EMA weights (the model itself when ``ema`` is None)."""
    if ema is None:
        return unet
    import copy

    model = copy.deepcopy(unet)
    ema.copy_to(model)
    return model
