"""The FID Inception v3: TensorFlow's 2015-12-05 graph ported to PyTorch, pool3 features (2048-d) and logits.

Parameter names and shapes are those of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision's
Inception v3 layout with num_classes=1008, no aux head), which torch-fidelity and torchmetrics load too.
Written here because torchvision cannot be imported beside the CPU torch (docs/engineering-notes.md §D.3). The TF graph
differs from torchvision's in four places (pytorch-fid FIDInceptionA/C/E_1/E_2): its 3x3 average pools ignore
the zero padding, and the last block max-pools its pool branch.

Input: uint8 (or 0..255 float) images (B, 3, H, W). Two resizes to 299 (docs/engineering-notes.md §B.1, §B.6, §C):
    'tf1'          TF1 bilinear (align_corners=False, no half-pixel centres), then (x-128)/128, as the TF graph
                   and torch-fidelity do: agrees with the ADM/TTUR TF evaluators.
    'pytorch-fid'  x/255, F.interpolate bilinear (align_corners=False), then 2x-1, as pytorch-fid and the official
                   DiM-DiffusionMamba/tools/fid_score.py: differs from TF wherever inputs are not 299x299.
There are no Inception weights offline (docs/engineering-notes.md §D.2): `resolve_weights` takes a path, the torch hub
cache, or downloads; otherwise it fails naming the file and where to put it.
"""
from __future__ import annotations

import hashlib
import os
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
RESIZE_MODES = ("tf1", "pytorch-fid")


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x):
    """3x3/1 average pool that, like TF's, averages over the unpadded pixels only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; the TF graph's last one (Mixed_7c) max-pools its pool branch."""

    def __init__(self, cin: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool_branch else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source coordinate = out * in/out (no half-pixel shift).

    Same arithmetic and order as TF's kernel (lerp along W on the two source rows, then along H), which is
    what torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x reproduces bit-exactly on CPU.
    """
    def axis(n_in):
        pos = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    dx, dy = dx.to(x.device), dy.to(x.device)
    rows_lo, rows_hi = x[:, :, y_lo.to(x.device)], x[:, :, y_hi.to(x.device)]          # (B, C, size, W)
    x_lo, x_hi = x_lo.to(x.device), x_hi.to(x.device)
    top = rows_lo[..., x_lo] + (rows_lo[..., x_hi] - rows_lo[..., x_lo]) * dx
    bottom = rows_hi[..., x_lo] + (rows_hi[..., x_hi] - rows_hi[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


class InceptionV3(nn.Module):
    """pool3 features (B, 2048) and unbiased logits (B, 1008) of uint8 images (B, 3, H, W)."""

    name = "inception-v3-tf-2015-12-05"
    dim, num_classes = 2048, 1008

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_sha256 = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W), or grey (B, 1, H, W), -> the network's input (B, 3, 299, 299) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception needs RGB or grey images (B, 3|1, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:  # grey -> RGB by repeating the channel, exactly Pillow's convert("RGB") of an "L"
            images = images.expand(-1, 3, -1, -1)
        x = images.to(self.fc.weight.device, torch.float32)
        if self.resize == "tf1":
            return (resize_tf1(x, 299) - 128) / 128                      # TF graph: Sub 128, Mul 1/128
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1                                                   # pytorch-fid normalize_input

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))       # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                             # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                            # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                             # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                       # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                     # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))        # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                       # (B, 2048, 8, 8)
        pool = x.mean((2, 3))                                                    # (B, 2048) pool3
        # IS uses logits without the fc bias, as ADM's evaluator (softmax/logits/MatMul) and torch-fidelity
        logits = pool @ self.fc.weight.T                                         # (B, 1008)
        return pool, logits


def resolve_weights(path: str | None = None, offline: bool = False) -> str:
    """The weights file: `path`, else the torch hub cache, else a download; a clear error when none works."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file; pass the path of {WEIGHTS_NAME}")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if os.path.isfile(cached):
        return cached
    offline = offline or os.environ.get("DIMSCALE_OFFLINE", "") not in ("", "0")
    if not offline and _online():
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, progress=True)
        return cached
    raise FileNotFoundError(
        f"Inception FID weights not found and no network to download them. Get {WEIGHTS_NAME} "
        f"(pytorch-fid's TF-ported weights, {WEIGHTS_URL}) on a machine with internet and either put it at "
        f"{cached} (the torch hub cache; set TORCH_HOME to move it) or pass --inception PATH. "
        f"Offline demos can use --detector classifier:PATH instead (not FID).")


def _online(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(path: str | None = None, resize: str = "tf1", device="cpu", offline: bool = False) -> InceptionV3:
    """InceptionV3 in eval mode with the pt_inception weights (strict key and shape check)."""
    path = resolve_weights(path, offline)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = InceptionV3(resize)
    own = model.state_dict()
    for key, value in own.items():        # files saved before BN counted batches lack these; harmless
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{path} is not {WEIGHTS_NAME}: missing keys {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shapes {bad_shape[:3]} (of {len(own)} tensors)")
    model.load_state_dict(state)
    model.weights_sha256 = sha256_file(path)
    model.weights_path = path
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def standin_state_dict(images: torch.Tensor, seed: int = 0) -> dict:
    """NOT the FID weights: a random Inception in the pt_inception layout for offline tests and benchmarks.

    Plain random init leaves BN at mean 0 / var 1 and pool3 features of ~1e-8, so every FID is 0
    (docs/engineering-notes.md §D.2). Re-estimating BN statistics in one train-mode pass over real images (uint8
    (B, 3, H, W), a dozen or more) gives features of ~0.3 and FIDs that respond to the data.
    """
    torch.manual_seed(seed)
    model = InceptionV3("tf1")
    for m in model.modules():     # torchvision's init_weights: truncated normal, std 0.1
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.1, a=-0.2, b=0.2)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None     # cumulative average: one pass sets the exact batch statistics
    model.train()(images)
    return model.state_dict()
