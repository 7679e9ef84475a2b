"""Diffusion objective, samplers and guidance (docs/reference.md §3.1, §4, §5). Runs on any denoiser callable."""
from dimscale.diffusion.guidance import cfg_denoiser, upsample_guidance
from dimscale.diffusion.samplers import SAMPLERS, ddim, dpm_solver, dpm_solver_pp, initial_noise, sample
from dimscale.diffusion.schedule import Schedule, drop_labels, training_loss

__all__ = ["Schedule", "training_loss", "drop_labels", "sample", "dpm_solver_pp", "dpm_solver", "ddim", "SAMPLERS",
           "initial_noise", "cfg_denoiser", "upsample_guidance"]
