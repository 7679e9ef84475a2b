"""dimscale: train DiM (Diffusion Mamba, arXiv 2405.14224) image generators at cluster scale."""
__version__ = "0.1.0"
