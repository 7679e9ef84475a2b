"""Schedule, loss, samplers, CFG and Upsample Guidance against closed forms (Gaussian data has an exact ε-predictor)."""
import math

import pytest
import torch

from dimscale.diffusion import Schedule, drop_labels, sample, training_loss
from dimscale.diffusion.guidance import downsample, ug_tau, upsample
from dimscale.diffusion.samplers import _dpmpp_step, fast_orders, initial_noise

S = Schedule()


pytestmark = pytest.mark.usefixtures("one_thread")


def coeffs(t: float):
    """(α_t, σ_t) of the continuous schedule as python floats."""
    tt = torch.tensor([t], dtype=torch.float64)
    return S.alpha(tt).item(), S.sigma(tt).item()


class GaussianDenoiser:
    """Exact ε-predictor for x0 ~ N(mu[y], sd² I): E[ε | x_t] = σ (x - α mu) / (α² sd² + σ²)."""

    def __init__(self, mus, sd, null_class):
        self.mus, self.sd, self.null_class = torch.tensor(mus, dtype=torch.float64), sd, null_class
        self.calls = []   # (batch size, labels, t) per forward

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone(), t.clone()))
        tc = t.double() / 1000
        a, s = S.alpha(tc).view(-1, 1, 1, 1), S.sigma(tc).view(-1, 1, 1, 1)
        mu = self.mus[y].view(-1, 1, 1, 1)
        return (s * (x.double() - a * mu) / (a * a * self.sd ** 2 + s * s)).float()


def exact_flow(x1, mu, sd, t_end=1e-3):
    """Exact probability-flow ODE map from t = 1 to t_end for Gaussian data: the standardised value is constant."""
    (a1, s1), (ae, se) = coeffs(1.0), coeffs(t_end)
    return ae * mu + math.sqrt(ae ** 2 * sd ** 2 + se ** 2) / math.sqrt(a1 ** 2 * sd ** 2 + s1 ** 2) * (x1.double() - a1 * mu)


# ------------------------------------------------------------------------------------------------ schedule, loss

def test_schedule_matches_closed_forms():
    n = torch.arange(1, 1001, dtype=torch.float64)
    betas = (0.00085 ** 0.5 + (n - 1) / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    assert S.betas.dtype == S.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(S.betas, betas, rtol=1e-12)
    assert S.betas[0].item() == pytest.approx(0.00085) and S.betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(S.alphas_cumprod, torch.exp(torch.cumsum(torch.log1p(-betas), 0)), rtol=1e-10)
    assert S.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=2e-4)       # SD schedule: nonzero terminal SNR
    # continuous time: α at the knots t = n/1000 is √ᾱ_n, log α is linear in between, λ inverts
    for k in (1, 2, 500, 999, 1000):
        assert coeffs(k / 1000)[0] == pytest.approx(S.alphas_cumprod[k - 1].item() ** 0.5, rel=1e-12)
    mid = S.log_alpha(torch.tensor([0.2505], dtype=torch.float64)).item()
    assert mid == pytest.approx(0.25 * math.log(S.alphas_cumprod[249].item() * S.alphas_cumprod[250].item()), rel=1e-9)
    t = torch.linspace(1e-3, 1.0, 777, dtype=torch.float64)
    assert torch.allclose(S.alpha(t) ** 2 + S.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)
    assert torch.allclose(S.t_of_lam(S.lam(t)), t, atol=1e-9)
    assert bool((S.lam(t)[1:] < S.lam(t)[:-1]).all())


def test_training_loss_uses_integer_steps_and_alphas_cumprod_index():
    """An oracle that inverts x_n with ᾱ at index n-1 gets zero loss: the network step n pairs with ᾱ_n."""
    x0 = torch.randn(512, 2, 4, 4)
    seen = []

    def oracle(x_n, t, y):
        seen.append(t.clone())
        abar = S.alphas_cumprod[t.long() - 1].float().view(-1, 1, 1, 1)
        return (x_n - abar.sqrt() * x0) / (1 - abar).sqrt()

    loss = training_loss(oracle, x0, torch.zeros(512, dtype=torch.long), S, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    t = seen[0]
    assert bool((t == t.round()).all()) and t.min() >= 1 and t.max() <= 1000 and t.max() > 900 and t.min() < 100

    # plain MSE over all elements against the same draws (same generator seed -> same n and ε)
    zero = lambda x, t, y: torch.zeros_like(x)
    g = torch.Generator().manual_seed(3)
    torch.randint(1, 1001, (512,), generator=g)  # the draws of n, so the noise below matches
    noise = torch.randn(x0.shape, generator=g)
    loss0 = training_loss(zero, x0, None, S, generator=torch.Generator().manual_seed(3))
    assert loss0.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_noise_shift_divides_snr_and_is_read_from_configs():
    """noise_shift k: SNR_n / k² at every step (1 = the paper's schedule), from a config object or a snapshot dict."""
    from dimscale.config import DiffusionConfig
    shifted = Schedule.from_config({"noise_shift": 2.0})
    assert torch.allclose(shifted.snr, S.snr / 4, rtol=1e-10)
    assert torch.equal(Schedule.from_config(DiffusionConfig(noise_shift=2.0)).alphas_cumprod, shifted.alphas_cumprod)
    assert torch.equal(Schedule.from_config({}).alphas_cumprod, S.alphas_cumprod)
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    assert torch.allclose(shifted.t_of_lam(shifted.lam(t)), t, atol=1e-9)   # the samplers' continuous view agrees
    with pytest.raises(ValueError, match="noise_shift > 0"):
        Schedule(noise_shift=0)


def test_min_snr_weights_each_image_by_min_snr_gamma_over_snr():
    """Min-SNR-γ (off by default): the per-image MSE times min(SNR_n, γ) / SNR_n for the drawn step n."""
    x0 = torch.randn(256, 1, 2, 2)
    zero = lambda x, t, y: torch.zeros_like(x)
    g = torch.Generator().manual_seed(5)
    n = torch.randint(1, 1001, (256,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    snr = S.snr[n - 1]
    want = (noise.pow(2).flatten(1).mean(1) * snr.clamp(max=5.0) / snr).mean()
    got = training_loss(zero, x0, None, S, generator=torch.Generator().manual_seed(5), min_snr_gamma=5.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    plain = training_loss(zero, x0, None, S, generator=torch.Generator().manual_seed(5))
    assert got.item() < 0.95 * plain.item()              # low-noise steps (SNR > 5) count less
    huge = training_loss(zero, x0, None, S, generator=torch.Generator().manual_seed(5), min_snr_gamma=1e9)
    assert huge.item() == pytest.approx(plain.item(), rel=1e-6)


def test_bf16_timesteps_option_rounds_only_the_network_input():
    seen = []
    model = lambda x, t, y: seen.append(t.clone()) or torch.zeros_like(x)
    x0 = torch.randn(4096, 1, 2, 2)
    training_loss(model, x0, None, S, generator=torch.Generator().manual_seed(1))
    training_loss(model, x0, None, S, generator=torch.Generator().manual_seed(1), bf16_timesteps=True)
    exact, rounded = seen
    assert torch.equal(rounded, exact.to(torch.bfloat16).float())
    assert bool((exact[exact > 512] % 4 != 0).any()) and bool((rounded[rounded > 512] % 4 == 0).all())
    assert bool((rounded[exact <= 256] == exact[exact <= 256]).all())


def test_drop_labels():
    y = torch.arange(10).repeat(2000)
    out = drop_labels(y, 0.15, null_class=1000, generator=torch.Generator().manual_seed(0))
    dropped = out == 1000
    assert 0.13 < dropped.float().mean().item() < 0.17
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 1000), y)
    with pytest.raises(ValueError, match="p_uncond"):
        drop_labels(y, 1.0, 1000)


# ------------------------------------------------------------------------------------------------ samplers

def test_fast_orders_match_official_nfe():
    assert fast_orders(50) == [3] * 16 + [2]               # docs/reference.md §4.1: 16 third-order + 1 second-order step
    for steps in range(1, 40):
        assert sum(fast_orders(steps)) == steps
    model = GaussianDenoiser([0.0], 1.0, null_class=1)
    for steps in (1, 2, 7, 50):
        model.calls.clear()
        sample(model, torch.zeros(2, dtype=torch.long), (1, 2, 2), steps=steps, cfg_scale=0.0, seeds=[0, 1], schedule=S)
        assert len(model.calls) == steps
        assert model.calls[0][2][0].item() == pytest.approx(1000.0)     # starts at T = 1, model gets 1000 t


@pytest.mark.parametrize("sampler,steps,var_tol,tol", [("dpm++", 25, 0.08, 0.08), ("dpm++", 50, 0.03, 0.04),
                                                       ("ddim", 50, 0.12, 0.15)])
def test_gaussian_data_reaches_exact_mean_and_variance(sampler, steps, var_tol, tol):
    mu, sd = 0.5, 0.8
    model = GaussianDenoiser([mu], sd, null_class=1)
    seeds = list(range(64))
    x = sample(model, torch.zeros(64, dtype=torch.long), (1, 16, 16), sampler=sampler, steps=steps, cfg_scale=0.0,
               seeds=seeds, schedule=S)
    x1 = initial_noise(seeds, (1, 16, 16))
    target = exact_flow(x1, mu, sd)
    # the x_T ~ N(0, I) prior is pushed exactly: mean α_e mu - k α_1 mu, variance k² (SD schedule: ᾱ_T = 0.0047 > 0)
    (a1, s1), (ae, se) = coeffs(1.0), coeffs(1e-3)
    k = math.sqrt(ae ** 2 * sd ** 2 + se ** 2) / math.sqrt(a1 ** 2 * sd ** 2 + s1 ** 2)
    assert x.mean().item() == pytest.approx(ae * mu - k * a1 * mu, abs=0.02)        # MC error of 16384 values ~ 0.006
    assert x.var().item() == pytest.approx(k ** 2, rel=var_tol)                      # MC error ~ 1%
    assert (x.double() - target).abs().max().item() < tol                             # per-sample, vs the exact ODE


def test_solvers_converge_and_dpmpp_beats_ddim():
    mu, sd = 0.3, 1.0
    model = GaussianDenoiser([mu], sd, null_class=1)
    seeds = list(range(8))
    target = exact_flow(initial_noise(seeds, (1, 8, 8)), mu, sd)
    err = {}
    for sampler in ("dpm++", "ddim"):
        for steps in (12, 24, 48):
            x = sample(model, torch.zeros(8, dtype=torch.long), (1, 8, 8), sampler=sampler, steps=steps,
                       cfg_scale=0.0, seeds=seeds, schedule=S)
            err[sampler, steps] = (x.double() - target).abs().max().item()
    for sampler in ("dpm++", "ddim"):
        assert err[sampler, 24] < 0.7 * err[sampler, 12] and err[sampler, 48] < 0.7 * err[sampler, 24]
    assert err["dpm++", 48] < 0.03 and err["dpm++", 48] < 0.5 * err["ddim", 48]


def test_singlestep_updates_have_their_local_order():
    """One DPM-Solver++(kS) step on a log-SNR-uniform sub-grid has local error O(h^(k+1)) (3S: r = 1/3, 2/3)."""
    mu, sd = 0.3, 1.0
    model = GaussianDenoiser([mu], sd, null_class=1)
    eps_fn = lambda x, t: model(x, 1000 * t, torch.zeros(len(x), dtype=torch.long))
    x1 = initial_noise(range(8), (1, 4, 4))
    for k, min_ratio in ((1, 3.5), (2, 7.0), (3, 14.0)):
        err = []
        for h in (0.4, 0.2):
            ts = S.t_of_lam(torch.linspace(-0.5, -0.5 + h, k + 1, dtype=torch.float64))
            x_s = exact_flow(x1, mu, sd, t_end=ts[0].item()).float()                    # on the exact trajectory
            x_t = _dpmpp_step(eps_fn, x_s, ts, S).double()
            err.append((x_t - exact_flow(x1, mu, sd, t_end=ts[-1].item())).abs().max().item())
        assert err[0] / err[1] > min_ratio, (k, err)


def test_results_invariant_to_batch_size():
    model = GaussianDenoiser([0.2, -0.4, 0.9, 0.0], 0.7, null_class=3)
    labels, seeds = torch.tensor([0, 1, 2, 1, 0]), [11, 5, 7, 100, 3]
    full = sample(model, labels, (2, 4, 4), steps=9, cfg_scale=0.4, seeds=seeds, schedule=S)
    parts = [sample(model, labels[i:i + 2], (2, 4, 4), steps=9, cfg_scale=0.4, seeds=seeds[i:i + 2], schedule=S)
             for i in range(0, 5, 2)]
    assert torch.allclose(full, torch.cat(parts), atol=1e-6)
    alone = sample(model, labels[3:4], (2, 4, 4), steps=9, cfg_scale=0.4, seeds=[100], schedule=S)
    assert torch.allclose(full[3:4], alone, atol=1e-6)
    assert not torch.allclose(full[0], full[4])       # same label, different seeds


# ------------------------------------------------------------------------------------------------ guidance

def test_cfg_zero_scale_equals_conditional_model_and_u_vit_form():
    mus, sd = [1.0, -1.0, 0.25], 0.6                   # class 2 is the null class (its mean plays ε_u)
    model = GaussianDenoiser(mus, sd, null_class=2)
    labels, seeds = torch.tensor([0, 1, 0]), [1, 2, 3]
    run = lambda m, s: sample(m, labels, (1, 8, 8), steps=30, cfg_scale=s, seeds=seeds, schedule=S)
    x = run(model, 0.0)
    cond_only = GaussianDenoiser(mus[:2], sd, null_class=7)   # would fail on any null-label call
    assert torch.allclose(x, run(cond_only, 0.0), atol=1e-6)
    mu_c = torch.tensor([mus[i] for i in labels]).view(-1, 1, 1, 1).double()
    assert (x.double() - exact_flow(initial_noise(seeds, (1, 8, 8)), mu_c, sd)).abs().max() < 0.1
    assert all(b == 3 for b, _, _ in model.calls)      # s = 0: the unconditional pass is skipped
    # equal-variance Gaussians: ε_c + s (ε_c - ε_u) is the exact ε of the mean mu_c + s (mu_c - mu_u)
    # (DiT's w-form with w = s would instead give mu_u + s (mu_c - mu_u))
    model.calls.clear()
    s = 0.7
    guided = run(model, s)
    extrapolated = GaussianDenoiser([mu + s * (mu - mus[2]) for mu in mus[:2]], sd, null_class=7)
    assert torch.allclose(guided, run(extrapolated, 0.0), atol=1e-4)
    assert (guided - x).abs().max() > 0.3
    for b, y, _ in model.calls:                        # one batched forward: labels then the null class
        assert b == 6 and torch.equal(y, torch.tensor([0, 1, 0, 2, 2, 2]))


class BlockDenoiser:
    """Exact ε for x0 = U_m(z), z ~ N(mu, sd² I) on a `base` grid, at any grid m·base: consistent across resolutions."""
    null_class = 1

    def __init__(self, mu, sd, base, low_res_bias=0.0):
        self.mu, self.sd, self.base, self.bias, self.calls = mu, sd, base, low_res_bias, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[-1], t.clone()))
        m, x, tc = x.shape[-1] // self.base, x.double(), t.double() / 1000
        a, s = S.alpha(tc).view(-1, 1, 1, 1), S.sigma(tc).view(-1, 1, 1, 1)
        dx = downsample(x, m)
        mean_eps = (s / m ** 2) * (dx - a * self.mu) / (a * a * self.sd ** 2 + s * s / m ** 2)   # E[D_m ε | D_m x]
        eps = (x - upsample(dx, m)) / s + upsample(mean_eps, m)                               # in-block part is ε
        return (eps + (self.bias if m == 1 else 0.0)).float()


@pytest.mark.parametrize("m", [2, 3])
def test_upsample_guidance(m):
    labels, seeds = torch.zeros(4, dtype=torch.long), [0, 1, 2, 3]
    model = BlockDenoiser(0.3, 0.8, base=4)
    run = lambda **kw: sample(model, labels, kw.pop("shape"), steps=12, cfg_scale=0.0, seeds=seeds, schedule=S, **kw)
    plain = run(shape=(1, 4 * m, 4 * m))
    # zero weight is exactly plain sampling at the high resolution
    assert torch.equal(run(shape=(1, 4, 4), upsample_factor=m, ug_theta=0.0), plain)
    # a model consistent across resolutions gets (almost) no correction: checks D_m, U_m, P and τ together
    model.calls.clear()
    guided = run(shape=(1, 4, 4), upsample_factor=m)
    assert guided.shape == (4, 1, 4 * m, 4 * m)
    assert (guided - plain).abs().max().item() < 0.01
    hi = [t[0].item() / 1000 for w, t in model.calls if w == 4 * m]
    lo = [t[0].item() / 1000 for w, t in model.calls if w == 4]
    assert len(lo) == sum(t >= 0.7 for t in hi) > 0    # base-grid pass only in the window t >= 1 - η
    for t_hi, t_lo in zip([t for t in hi if t >= 0.7], lo):
        assert t_lo <= t_hi
        n_t, n_tau = int(t_hi * 1000), round(t_lo * 1000)
        assert S.snr[n_tau - 1] / (m * m * S.snr[n_t - 1]) == pytest.approx(1.0, rel=0.02)
    # a low-res model that disagrees with the high-res one does steer the sample
    biased = BlockDenoiser(0.3, 0.8, base=4, low_res_bias=0.5)
    off = sample(biased, labels, (1, 4, 4), steps=12, cfg_scale=0.0, seeds=seeds, schedule=S, upsample_factor=m)
    assert (off - plain).abs().max().item() > 0.1


def test_ug_tau_is_clamped_and_matches_the_snr_grid():
    t = torch.tensor([1.0, 0.9, 0.75, 0.3, 0.01], dtype=torch.float64)
    for m in (2, 3):
        abar, tau = ug_tau(S, t, m)
        assert bool((tau <= t).all())
        n_tau = (tau * 1000).round().long()
        best = (S.snr - m * m * abar[:, None] / (1 - abar[:, None])).abs().argmin(1) + 1
        assert torch.equal(torch.minimum(best, (t * 1000).floor().long()), n_tau)


def test_sample_rejects_bad_arguments():
    model = GaussianDenoiser([0.0], 1.0, null_class=1)
    with pytest.raises(ValueError, match="seeds"):
        sample(model, torch.zeros(2, dtype=torch.long), (1, 2, 2), seeds=[0], schedule=S)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, torch.zeros(1, dtype=torch.long), (1, 2, 2), seeds=[0], sampler="euler")


# ------------------------------------------------------------------------------------------------ VAE

def test_vae_load_encode_decode(tmp_path):
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from dimscale.diffusion.vae import decode, encode_moments, load_vae, sample_latent

    with pytest.raises(FileNotFoundError, match="--vae PATH"):
        load_vae(str(tmp_path / "nope"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  latent_channels=4, norm_num_groups=8, layers_per_block=1).save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    moments = encode_moments(vae, x)
    assert moments.shape == (2, 8, 8, 8)
    z = sample_latent(moments, 0.18215, generator=torch.Generator().manual_seed(0))
    mean = moments[:, :4]
    assert z.shape == (2, 4, 8, 8) and not torch.allclose(z, 0.18215 * mean)
    assert torch.allclose(decode(vae, 0.18215 * mean, 0.18215), vae.decode(mean).sample, atol=1e-5)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--vae PATH"):
        load_vae(str(tmp_path / "broken"))
