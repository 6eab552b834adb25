"""A Stable-Diffusion-family pipeline as an RL policy whose actions are denoising steps.

The denoising loop is written out here (not delegated to the pipeline's __call__) so every step's
Gaussian log-probability is known (diffusion_rl/steps.py):

- `sample` draws x_T and every step's noise from a generator keyed by (seed, global sample id), so a
  sample is identical under any batch or process layout; it stores the trajectory (x_t and x_{t-1}
  per step, timesteps, prompt embeddings) and the sampling log-probs, and decodes x_0 with the VAE.
- `log_probs` recomputes log p(x_{t-1} | x_t) of the stored transitions under the current UNet, for
  the trained steps only (mask), as flattened UNet batches of (sample, step) pairs:
  `model.logprob_chunk_size` pairs per call (x 2 with classifier-free guidance), each chunk
  activation-checkpointed when there are several, so a micro-batch of long trajectories fits.
  Sampling denoises and decodes `task.sample_batch_size` images at a time.
- the reference is a frozen copy of the UNet, or the same UNet with its LoRA adapter disabled.

Classifier-free guidance is part of the policy: eps = eps_u + g (eps_c - eps_u), in sampling and in
log-probs alike (as DDPO trains).
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image
from torch import Tensor, nn

from diffusion_rl.steps import STEPS, step_kl
from shared.rollout import Rollout

NOISE_STREAM = 1_000_003  # generator seed = seed * NOISE_STREAM + sample id
EVAL_SEED = 999_983  # evaluation images use seed EVAL_SEED and sample id = the row's "seed"
MASK_STREAM = 2**40  # trained-step subsets draw from generators offset by this (never a noise generator's seed)


class GuidedUNet(nn.Module):
    """Noise prediction with classifier-free guidance: the module accelerate wraps and training calls."""

    def __init__(self, unet: nn.Module, guidance_scale: float):
        super().__init__()
        self.model = unet
        self.guidance_scale = guidance_scale

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        return guided_eps(self.model, x, t, cond, uncond, self.guidance_scale)


def guided_eps(unet, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, g: float) -> Tensor:
    """eps_u + g (eps_c - eps_u) from one UNet call on the doubled batch (g = 1: conditional only)."""
    if g == 1.0:
        return unet(x, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = out.chunk(2)
    return u + g * (c - u)


def latent_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return unet.config.in_channels, h, w


def to_images(decoded: Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], [N, 3, H, W] -> RGB PIL images."""
    arr = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class DiffusionPolicy:
    def __init__(self, pipe, unet: nn.Module | None = None, num_steps: int = 10, guidance_scale: float = 3.0,
                 eta: float = 1.0, eval_eta: float = 1.0, timestep_fraction: float = 1.0, step: str = "ddim",
                 sample_batch_size: int = 64, logprob_chunk_size: int = 1024):
        import diffusers

        self.module: nn.Module = GuidedUNet(unet if unet is not None else pipe.unet, guidance_scale)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        self.kind = STEPS[step]  # the step's own scheduler lays out the timesteps (DDIM, or flow matching)
        self.scheduler = getattr(diffusers, self.kind.scheduler).from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(num_steps)
        self.schedule = self.kind.schedule(self.scheduler)
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.eta, self.eval_eta, self.timestep_fraction = eta, eval_eta, timestep_fraction
        self.sample_batch_size, self.logprob_chunk_size = sample_batch_size, logprob_chunk_size
        self.unwrap = lambda m: m  # replaced by accelerator.unwrap_model once prepared
        self._reference: nn.Module | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def unet(self) -> nn.Module:
        return self.unwrap(self.module).model

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.text_encoder.device))[0].to(self.device)

    def noise(self, seed: int, sample_ids: list[int]) -> Tensor:
        """[B, S + 1, C, H, W]: x_T and each step's noise, from one CPU generator per sample."""
        shape = (self.num_steps + 1, *latent_shape(self.unet()))
        out = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * NOISE_STREAM + i)) for i in sample_ids]
        return torch.stack(out).to(self.device)

    def trained_steps(self, seed: int, sample_ids: list[int]) -> Tensor:
        """[B, S] mask of the steps trained for each sample (a random subset when timestep_fraction < 1)."""
        S = self.num_steps
        k = max(1, round(self.timestep_fraction * S))
        mask = torch.zeros(len(sample_ids), S)
        for row, i in enumerate(sample_ids):
            g = torch.Generator().manual_seed(MASK_STREAM + seed * NOISE_STREAM + i)
            mask[row, torch.randperm(S, generator=g)[:k]] = 1.0
        return mask.to(self.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return to_images(self.vae.decode(z).sample)

    @contextlib.contextmanager
    def eval_mode(self):
        """Sampling runs the trained module in eval mode (no LoRA dropout), restoring its mode after."""
        inner = self.unwrap(self.module)
        was_training = inner.training
        inner.eval()
        try:
            yield inner
        finally:
            inner.train(was_training)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference as a GuidedUNet: the base with the LoRA adapter disabled, or the copy."""
        inner = self.unwrap(self.module)
        if hasattr(inner.model, "disable_adapter"):
            with inner.model.disable_adapter():
                yield inner
        elif self._reference is None:
            raise RuntimeError("reference requested but not built: call build_reference() first")
        else:
            yield self._reference

    @torch.no_grad()
    def denoise(self, eps_fn, noise: Tensor, cond: Tensor, uncond: Tensor, eta: float, on_step=None) -> Tensor:
        """The sampling loop: x_T = noise[:, 0], then one step per timestep; returns x_0.

        `eps_fn(x, t, cond, uncond)` predicts the (guided) noise, or the velocity for a flow step;
        `on_step(s, x_t, t, eps, x_prev, logp)` sees every transition (trajectory storage, KL).
        """
        x = noise[:, 0]
        for s, t in enumerate(self.scheduler.timesteps.tolist()):
            tt = torch.full((x.shape[0],), t, dtype=self.kind.timestep_dtype, device=x.device)
            eps = eps_fn(x, tt, cond, uncond)
            x_prev, logp = self.kind.step(eps, x, tt, self.schedule, eta, noise=noise[:, s + 1])
            if on_step is not None:
                on_step(s, x, tt, eps, x_prev, logp)
            x = x_prev
        return x

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def sample(self, rows: list[dict], n: int, seed: int, first_sample_id: int, first_group_id: int) -> Rollout:
        t0 = time.perf_counter()
        rows_rep = [r for r in rows for _ in range(n)]
        ids = list(range(first_sample_id, first_sample_id + len(rows_rep)))
        cond = self.encode_prompts([r["prompt"] for r in rows]).repeat_interleave(n, 0)
        uncond = self.encode_prompts([""]).expand_as(cond).contiguous()
        traj: dict[str, list] = {"latents": [], "next_latents": [], "timesteps": [], "logp": []}

        def store(s, x, t, eps, x_prev, logp):
            traj["latents"].append(x), traj["next_latents"].append(x_prev)
            traj["timesteps"].append(t), traj["logp"].append(logp)

        images, parts = [], []
        with self.eval_mode() as model:
            for c in range(0, len(ids), self.sample_batch_size):  # bounded memory: denoise and decode in chunks
                part = slice(c, c + self.sample_batch_size)
                x0 = self.denoise(model, self.noise(seed, ids[part]), cond[part], uncond[part], self.eta, store)
                images += self.decode(x0)
                parts.append({k: torch.stack(v, 1) for k, v in traj.items()})
                traj = {k: [] for k in traj}
        S, B = self.num_steps, len(rows_rep)
        inputs = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "next_latents", "timesteps")}
        inputs |= {"prompt_embeds": cond, "negative_embeds": uncond}
        stats = {"completion_len_mean": float(S), "completion_len_max": float(S), "truncated_frac": 0.0,
                 "sample_tokens": float(B * S), "sample_seconds": time.perf_counter() - t0}
        return Rollout(inputs=inputs, mask=self.trained_steps(seed, ids),
                       group_ids=torch.arange(first_group_id, first_group_id + len(rows)).repeat_interleave(n),
                       completions=images, rows=rows_rep, old_logp=torch.cat([p["logp"] for p in parts]).float(),
                       stats=stats)

    def _chunk_logp(self, eps_model, x, t, cond, uncond, x_prev) -> Tensor:
        eps = eps_model(x, t, cond, uncond)
        return self.kind.step(eps, x, t, self.schedule, self.eta, x_prev=x_prev)[1]

    def _transition_logp(self, eps_model, batch: Rollout) -> Tensor:
        """log p(x_{t-1} | x_t) [B, S] of the stored transitions at the trained steps (0 elsewhere).

        The (sample, step) pairs go through the UNet `logprob_chunk_size` at a time; with several chunks
        and gradients on, each chunk is activation-checkpointed, so memory holds one chunk's activations.
        """
        inp = batch.inputs
        b, s = batch.mask.nonzero(as_tuple=True)
        args = (inp["latents"][b, s], inp["timesteps"][b, s], inp["prompt_embeds"][b], inp["negative_embeds"][b],
                inp["next_latents"][b, s])
        k = self.logprob_chunk_size
        checkpoint = torch.is_grad_enabled() and len(b) > k
        lps = []
        for c in range(0, len(b), k):
            chunk = [a[c : c + k] for a in args]
            lps.append(torch.utils.checkpoint.checkpoint(self._chunk_logp, eps_model, *chunk, use_reentrant=False)
                       if checkpoint else self._chunk_logp(eps_model, *chunk))
        lp = torch.cat(lps)
        out = torch.zeros(batch.mask.shape, dtype=lp.dtype, device=lp.device)
        return out.index_put((b, s), lp)

    def log_probs(self, batch: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-step log-probs under the trained UNet (gradients flow). The step entropy is a constant of
        the schedule (Gaussian with fixed std), so no entropy is returned."""
        return self._transition_logp(self.module, batch), None

    @torch.no_grad()
    def reference_log_probs(self, batch: Rollout) -> Tensor:
        with self.reference() as ref:
            return self._transition_logp(ref, batch)

    def build_reference(self) -> None:
        """Freeze a copy of the current UNet as the reference (not needed with LoRA; built once)."""
        inner = self.unwrap(self.module)
        if hasattr(inner.model, "disable_adapter") or self._reference is not None:
            return
        self._reference = copy.deepcopy(inner).requires_grad_(False).eval()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def complete(self, rows: list[dict]) -> list[dict]:
        """Per row, from fixed noise seeded by `row["seed"]`: the held-out image (DDIM with eta = eval_eta,
        1 by default: the training sampler), the deterministic ODE image (eta = 0), and the KL of the
        stochastic trajectory to the reference (sum over steps of the closed-form per-step KL, averaged
        over latent dims; None without a reference)."""
        noise = self.noise(EVAL_SEED, [int(r.get("seed", i)) for i, r in enumerate(rows)])
        cond = self.encode_prompts([r["prompt"] for r in rows])
        uncond = self.encode_prompts([""]).expand_as(cond).contiguous()
        kl_eta = self.eval_eta if self.eval_eta > 0 else self.eta  # the KL needs a stochastic trajectory
        kl = torch.zeros(len(rows), device=self.device)
        with self.eval_mode() as inner:
            has_ref = self._reference is not None or hasattr(inner.model, "disable_adapter")

            def add_kl(s, x, t, eps, x_prev, logp):
                with self.reference() as ref:
                    eps_ref = ref(x, t, cond, uncond)
                mean, std = self.kind.mean_std(eps, x, t, self.schedule, kl_eta)
                mean_ref, _ = self.kind.mean_std(eps_ref, x, t, self.schedule, kl_eta)
                kl.add_(step_kl(mean, mean_ref, std))

            track = add_kl if has_ref else None
            stochastic = self.eval_eta > 0
            images = self.decode(self.denoise(inner, noise, cond, uncond, self.eval_eta, track if stochastic else None))
            if stochastic:
                ode = self.decode(self.denoise(inner, noise, cond, uncond, 0.0))
            else:
                ode = images
                if has_ref:
                    self.denoise(inner, noise, cond, uncond, kl_eta, track)
        return [{"image": im, "ode_image": od, "kl": float(k) if has_ref else None}
                for im, od, k in zip(images, ode, kl)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def save_pretrained(self, path) -> None:
        """The UNet (or its LoRA adapter) in diffusers/peft format."""
        self.unet().save_pretrained(path, safe_serialization=True)
