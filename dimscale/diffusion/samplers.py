"""DPM-Solver++ and DDIM over the discrete schedule in continuous time, and `sample()` (docs/reference.md §4.1).

Official setting: DPM-Solver++ (data prediction, arXiv 2211.01095), method 'fast' of order 3, time-uniform steps
from T = 1 to eps = 1/N, 50 NFE = 16 third-order steps + 1 second-order step, no final denoising step.
Each solver step of order k spans k intervals of the time-uniform grid of `steps` intervals and evaluates the model
at the grid points inside it (singlestep DPM-Solver++(kS) with r_j = (λ_{s_j} - λ_s) / h), as U-ViT's dpm_solver_pp.
DDIM (η = 0) is the first-order DPM-Solver++ step (docs/reference.md §4.1), so it shares the same code.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from dimscale.diffusion.guidance import cfg_denoiser, upsample_guidance
from dimscale.diffusion.schedule import Schedule


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> torch.Tensor:
    """Time-uniform grid of `steps` intervals from t_start down to t_end, float64 (steps + 1,)."""
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def fast_orders(steps: int, order: int = 3) -> list[int]:
    """Solver orders of DPM-Solver-fast summing to `steps` NFE: K = steps // 3 + 1 steps, mostly third order."""
    if steps < 1:
        raise ValueError(f"steps = {steps}: the sampler needs at least 1 step")
    if order == 1:
        return [1] * steps
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order != 3:
        raise ValueError(f"order = {order}: DPM-Solver++ supports order 1, 2 or 3")
    K = steps // 3 + 1
    return {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[steps % 3]


def _dpm_step(eps_fn, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """One singlestep DPM-Solver step (noise prediction, DPM-Solver paper Alg. 1/2 'dpm_solver' type; the official
    UG configs call DPM_Solver with predict_x0=False) of order k = len(ts) - 1, same time points as _dpmpp_step."""
    k = len(ts) - 1
    lam, la, sigma = schedule.lam(ts).tolist(), schedule.log_alpha(ts).tolist(), schedule.sigma(ts).tolist()
    h = lam[-1] - lam[0]
    r = [(l - lam[0]) / h for l in lam[1:-1]]

    def eps(x_j: torch.Tensor, j: int) -> torch.Tensor:
        return eps_fn(x_j, torch.full((x.shape[0],), float(ts[j]), device=x.device, dtype=x.dtype))

    phi_1 = math.expm1(h)
    e0 = eps(x, 0)
    x_t = math.exp(la[-1] - la[0]) * x - sigma[-1] * phi_1 * e0                      # first order = DDIM
    if k == 1:
        return x_t
    r1 = r[0]
    x1 = math.exp(la[1] - la[0]) * x - sigma[1] * math.expm1(r1 * h) * e0
    e1 = eps(x1, 1)
    if k == 2:
        return x_t - (0.5 / r1) * sigma[-1] * phi_1 * (e1 - e0)
    r2 = r[1]
    phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
    x2 = (math.exp(la[2] - la[0]) * x - sigma[2] * math.expm1(r2 * h) * e0
          - (r2 / r1) * sigma[2] * phi_22 * (e1 - e0))
    e2 = eps(x2, 2)
    phi_2 = phi_1 / h - 1.0
    return x_t - (1.0 / r2) * sigma[-1] * phi_2 * (e2 - e0)


def _dpmpp_step(eps_fn, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """One singlestep DPM-Solver++ step of order k = len(ts) - 1 from s = ts[0] to t = ts[-1], evaluating the model
    at s and at the intermediate times ts[1:-1] (DPM-Solver++ paper Alg. 1 and its 3S form, 'dpm_solver' variant).
    D_j = (x_j - σ_j ε̂_j) / α_j are data predictions; h = λ_t - λ_s; r_j = (λ_{s_j} - λ_s) / h."""
    k = len(ts) - 1
    lam, alpha, sigma = schedule.lam(ts).tolist(), schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist()
    h = lam[-1] - lam[0]
    r = [(l - lam[0]) / h for l in lam[1:-1]]

    def data_pred(x_j: torch.Tensor, j: int) -> torch.Tensor:
        t_j = torch.full((x.shape[0],), float(ts[j]), device=x.device, dtype=x.dtype)   # (B,)
        return (x_j - sigma[j] * eps_fn(x_j, t_j)) / alpha[j]

    phi_1 = math.expm1(-h)                                                            # e^{-h} - 1 < 0
    D0 = data_pred(x, 0)
    x_t = (sigma[-1] / sigma[0]) * x - alpha[-1] * phi_1 * D0                         # first order = DDIM
    if k == 1:
        return x_t
    r1 = r[0]
    x1 = (sigma[1] / sigma[0]) * x - alpha[1] * math.expm1(-r1 * h) * D0
    D1 = data_pred(x1, 1)
    if k == 2:
        return x_t - (0.5 / r1) * alpha[-1] * phi_1 * (D1 - D0)
    r2 = r[1]
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
    x2 = ((sigma[2] / sigma[0]) * x - alpha[2] * math.expm1(-r2 * h) * D0
          + (r2 / r1) * alpha[2] * phi_22 * (D1 - D0))
    D2 = data_pred(x2, 2)
    phi_2 = phi_1 / h + 1.0
    return x_t + (1.0 / r2) * alpha[-1] * phi_2 * (D2 - D0)


def dpm_solver_pp(eps_fn, x: torch.Tensor, schedule: Schedule, steps: int = 50, order: int = 3,
                  t_start: float = 1.0, t_end: float | None = None, progress: bool = False,
                  step_fn=_dpmpp_step) -> torch.Tensor:
    """Solve the probability-flow ODE from t_start to t_end (default 1/N) with DPM-Solver-fast++ in `steps` NFE
    (step_fn=_dpm_step: the noise-prediction DPM-Solver-fast on the same grid)."""
    t_end = 1.0 / schedule.num_timesteps if t_end is None else t_end
    ts = time_grid(steps, t_start, t_end)
    i = 0
    with tqdm(total=steps, disable=not progress, desc="sampling", unit="nfe") as bar:
        for k in fast_orders(steps, order):
            x = step_fn(eps_fn, x, ts[i:i + k + 1], schedule)
            i += k
            bar.update(k)
    return x


def ddim(eps_fn, x: torch.Tensor, schedule: Schedule, steps: int = 50, t_start: float = 1.0,
         t_end: float | None = None, progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM (η = 0) on the same time-uniform grid: x_t = α_t x̂0 + σ_t ε̂ at each step."""
    return dpm_solver_pp(eps_fn, x, schedule, steps, order=1, t_start=t_start, t_end=t_end, progress=progress)


def dpm_solver(eps_fn, x: torch.Tensor, schedule: Schedule, steps: int = 50, t_start: float = 1.0,
               t_end: float | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver-fast (noise prediction, order 3), the official Upsample Guidance sampler (docs/reference.md §5.1)."""
    return dpm_solver_pp(eps_fn, x, schedule, steps, 3, t_start, t_end, progress, step_fn=_dpm_step)


SAMPLERS = {"dpm++": dpm_solver_pp, "ddim": ddim, "dpm": dpm_solver}


def initial_noise(seeds, shape: tuple) -> torch.Tensor:
    """x_T (B, *shape): sample i's noise comes from a CPU torch.Generator seeded with seeds[i] alone, so a sample
    does not depend on batch size, rank count or device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(model, labels: torch.Tensor, shape: tuple, *, sampler: str = "dpm++", steps: int = 50,
           cfg_scale: float = 0.4, seeds, schedule: Schedule | None = None, upsample_factor: int = 1,
           ug_theta: float = 1.0, ug_eta: float = 0.3, ug_official: bool = False, device=None,
           progress: bool = False) -> torch.Tensor:
    """Generate x0 (B, C, mH, mW) for labels (B,) from base shape (C, H, W) and m = upsample_factor.

    `model(x, t, y) -> eps` is any denoiser with a `null_class` attribute (t in [0, 1000]). With m > 1 the model
    runs on the m-times larger grid (DiM interpolates its pos-emb) and Upsample Guidance
    (docs/reference.md §5.2) steers it with base-grid passes during t >= 1 - ug_eta (ug_official: the official
    code's τ time values, see guidance.ug_tau). A model built at the m-times grid (a converted upsampling release)
    sees its stored pos-emb in the high-res pass and a bilinear resize of it in the base pass, as the official
    deploy configs do. Returns the ODE state at t = 1/N, as the official sampler does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = '{sampler}' is not one of {', '.join(SAMPLERS)}")
    if len(shape) != 3:
        raise ValueError(f"shape = {tuple(shape)} must be the per-sample (C, H, W)")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds; pass one seed per sample")
    if not hasattr(model, "null_class"):
        raise TypeError("the denoiser needs a `null_class` attribute (the CFG null label, = num_classes for DiM)")
    schedule = schedule or Schedule()
    if device is None:
        param = next(model.parameters(), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    C, H, W = shape
    m = int(upsample_factor)
    x = initial_noise(seeds, (C, m * H, m * W)).to(device)
    eps_fn = cfg_denoiser(model, torch.as_tensor(labels, dtype=torch.long).to(device), cfg_scale,
                          schedule.num_timesteps)
    if m != 1:
        eps_fn = upsample_guidance(eps_fn, schedule, m, theta=ug_theta, eta=ug_eta, official=ug_official)
    return SAMPLERS[sampler](eps_fn, x, schedule, steps, progress=progress)
