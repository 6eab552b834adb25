"""Supervised warm-up of the embedded pipeline: autoencoder, then the standard denoising loss; cached.

1. `AutoencoderKL` on the task's synthetic images: L2 reconstruction + 1e-6 KL, `task.vae_steps` steps;
   then `scaling_factor` is set so latents have unit variance (as Stable Diffusion's 0.18215 does).
2. `UNet2DConditionModel` on those latents: eps-prediction MSE at uniform random timesteps of the
   DDPM forward process (the scheduler's betas), prompts dropped to "" at `task.caption_dropout` so
   classifier-free guidance works; the text encoder stays frozen, as in Stable Diffusion. With a
   flow-matching scheduler (`task.step: flow_sde`) the loss is rectified flow's instead: x_s =
   (1 - s) z + s noise at s ~ U(0, 1), timestep 1000 s, target velocity noise - z.

The result is written atomically with `StableDiffusionPipeline.save_pretrained` under a directory named
by a hash of everything that determines it (not the RL seed: every RL seed starts from the same base)
and loaded back with `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_scheduler

VERSION = 3  # bump when the recipe below or the task's image generator changes


PRETRAIN_FIELDS = ("image_size", "min_size", "max_size", "unet_channels", "text_dim", "vae_steps", "caption_dropout",
                   "step")


def pretrain_dir(cfg) -> Path:
    """Cache directory keyed by what determines the pre-trained weights (not sampling or RL options)."""
    task = {k: cfg.task[k] for k in PRETRAIN_FIELDS}
    blob = json.dumps({"v": VERSION, "task": task, "warmup": cfg.warmup.model_dump(exclude={"cache_dir", "eval_every",
                                                                                          "patience"})},
                      sort_keys=True)
    return Path(cfg.warmup.cache_dir) / f"diffusion-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def to_pixels(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode_text(pipe, prompts: list[str], device) -> torch.Tensor:
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(device))[0]


def _optimizer(params, lr, wcfg, steps):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wcfg.weight_decay)
    sched = get_scheduler({"constant": "constant_with_warmup", "cosine": "cosine"}[wcfg.schedule], opt,
                          num_warmup_steps=min(wcfg.warmup_steps, steps), num_training_steps=max(steps, 1))
    return opt, sched


def _update(loss, module, opt, sched, losses: list[float], step: int, log, what: str) -> None:
    """Backward, clip at 1, optimizer and schedule step; log the running mean every 100 steps."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if step % 100 == 0:
        log(f"{what} step {step}: loss {sum(losses[-100:]) / 100:.4f}")


def train_vae(pipe, task, wcfg, rng: random.Random, log) -> list[float]:
    vae, losses = pipe.vae, []
    steps = task.cfg.vae_steps
    opt, sched = _optimizer(vae.parameters(), wcfg.lr, wcfg, steps)
    vae.train()
    for step in range(1, steps + 1):
        x = to_pixels(task.pretrain_batch(wcfg.batch_size, rng)[1])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        _update(F.mse_loss(recon, x) + 1e-6 * post.kl().mean(), vae, opt, sched, losses, step, log, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_pixels(task.pretrain_batch(64, rng)[1])).latent_dist.sample() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return losses


def train_unet(pipe, task, wcfg, rng: random.Random, log) -> list[float]:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    unet, vae = pipe.unet, pipe.vae
    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    noise_sched = pipe.scheduler if flow else DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.text_encoder.eval().requires_grad_(False)
    opt, sched = _optimizer(unet.parameters(), wcfg.lr, wcfg, wcfg.max_steps)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    unet.train()
    losses = []
    for step in range(1, wcfg.max_steps + 1):
        prompts, images = task.pretrain_batch(wcfg.batch_size, rng)
        prompts = ["" if rng.random() < task.cfg.caption_dropout else p for p in prompts]
        with torch.no_grad():
            z = vae.encode(to_pixels(images)).latent_dist.sample(gen) * vae.config.scaling_factor
            emb = encode_text(pipe, prompts, z.device)
        noise = torch.randn(z.shape, generator=gen)
        n_train = noise_sched.config.num_train_timesteps
        if flow:
            s = torch.rand(z.shape[0], generator=gen).view(-1, 1, 1, 1)
            x, t, target = (1 - s) * z + s * noise, (s.flatten() * n_train), noise - z
        else:
            t = torch.randint(0, n_train, (z.shape[0],), generator=gen)
            x, target = noise_sched.add_noise(z, noise, t), noise
        pred = unet(x, t, encoder_hidden_states=emb).sample
        _update(F.mse_loss(pred, target), unet, opt, sched, losses, step, log, "unet")
    return losses


def pretrain(pipe, task, wcfg, log=print) -> dict:
    """Train the pipeline's VAE and UNet in place; returns the warm-up record."""
    t0, rng = time.time(), random.Random(0)
    torch.manual_seed(0)
    vae_losses = train_vae(pipe, task, wcfg, rng, log)
    unet_losses = train_unet(pipe, task, wcfg, rng, log)
    tail = lambda xs: sum(xs[-50:]) / max(len(xs[-50:]), 1)  # noqa: E731
    return {"vae_steps": len(vae_losses), "vae_loss": tail(vae_losses), "unet_steps": len(unet_losses),
            "unet_loss": tail(unet_losses), "seconds": time.time() - t0}


def save_pipeline(pipe, record: dict, out: Path) -> None:
    """`save_pretrained` into a temporary directory, then rename into place (a crash leaves no half cache)."""
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
