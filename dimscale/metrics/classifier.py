"""A small Fashion-MNIST classifier: the offline stand-in detector for demos. Its numbers are NOT FID.

There are no Inception weights offline (docs/engineering-notes.md §D.2), so the demo measures samples with a classifier
trained here on the demo data: a Fréchet distance in its 128-d penultimate features ("Fréchet classifier
distance", FCD) and the accuracy of the classifier on class-conditional samples (does a sample of class c look
like class c?). It takes any uint8 image (B, 1|3, H, W): grey = channel mean, resized to 28x28.

    python -m dimscale.metrics.classifier train --out runs/fmnist_classifier.safetensors            # IDX files
    python -m dimscale.metrics.classifier train --shards data/shards/manifest.json --out PATH         # shards
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SIDE = 28


class SmallClassifier(nn.Module):
    """Two conv+pool stages and a 128-d hidden layer; features = that layer (after ReLU), logits (B, classes).

    Kept small (~1 MFLOP per image) so it trains in about a minute on two shared CPU cores."""

    name = "fmnist-classifier"
    dim = 128

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),                 # (B, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))             # (B, 2w, 7, 7)
        self.hidden = nn.Linear(2 * w * 7 * 7, self.dim)
        self.head = nn.Linear(self.dim, num_classes)
        self.weights_sha256 = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> grey (B, 1, 28, 28) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"classifier needs images (B, 1|3, H, W), got {tuple(images.shape)}")
        x = images.to(self.head.weight.device, torch.float32).mean(1, keepdim=True)
        if x.shape[-2:] != (SIDE, SIDE):
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
        return x / 127.5 - 1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, 128), logits (B, classes)) of uint8 images."""
        feats = F.relu(self.hidden(self.conv(self.preprocess(images)).flatten(1)))
        return feats, self.head(feats)


def train_classifier(images, labels, *, out: str | None = None, epochs: int = 2, batch: int = 128, lr: float = 2e-3,
                     seed: int = 0, test: tuple | None = None, num_classes: int = 10, log=print) -> SmallClassifier:
    """Train on uint8 images (N, H, W) or (N, C, H, W) with labels (N,); save to `out` (.safetensors) if given.

    ~1 min on 2 CPU cores for 2 epochs of Fashion-MNIST (60k), ~91% test accuracy.
    """
    x = torch.as_tensor(np.array(images))
    x = x[:, None] if x.ndim == 3 else x                                        # (N, C, H, W) uint8
    y = torch.as_tensor(np.array(labels), dtype=torch.long)
    if len(x) != len(y) or x.dtype != torch.uint8:
        raise ValueError(f"need uint8 images and one label each, got {tuple(x.shape)} {x.dtype} and {len(y)} labels")
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            _, logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    meta = {"num_classes": num_classes, "width": model.width, "train_images": len(x), "epochs": epochs}
    if test is not None:
        meta["test_accuracy"] = accuracy(model, test[0] if np.ndim(test[0]) == 4 else np.asarray(test[0])[:, None],
                                         test[1])
        log(f"test accuracy {meta['test_accuracy']:.4f}")
    if out:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out,
                  metadata={"dimscale": json.dumps(meta)})
    model.meta = meta
    return model


def load_classifier(path: str, device="cpu") -> SmallClassifier:
    """A classifier saved by train_classifier, in eval mode, with its sha256 and metadata."""
    from safetensors import safe_open
    from dimscale.metrics.inception import sha256_file
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("dimscale", "{}"))
    except Exception as e:
        raise ValueError(f"{path} is not a classifier file: {e}; train one with "
                         "`python -m dimscale.metrics.classifier train --out PATH`") from e
    model = SmallClassifier(meta.get("num_classes", 10), meta.get("width", 16))
    model.load_state_dict(load_file(path))
    model.weights_sha256, model.weights_path, model.meta = sha256_file(path), path, meta
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: SmallClassifier, images, labels, batch: int = 512) -> float:
    """Share of images (uint8 (N, C, H, W)) the classifier assigns to their intended labels (N,)."""
    x, y = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.array(labels), dtype=torch.long)
    correct = sum((model(x[i:i + batch])[1].argmax(1).cpu() == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / max(1, len(x))


def _shard_arrays(spec: str, limit: int | None):
    """All images (as grey 28x28) and labels of WebDataset shards."""
    from dimscale.metrics.sources import ShardSource
    xs, ys = [], []
    for _, imgs, labels in ShardSource(spec).batches(1024, 0, 1, limit):
        for im in imgs:
            g = im.float().mean(0, keepdim=True)[None]
            xs.append(F.interpolate(g, size=(SIDE, SIDE), mode="bilinear", antialias=True)[0].round().to(torch.uint8))
        ys.append(labels)
    y = torch.cat(ys)
    if (y < 0).any():
        raise ValueError(f"{spec}: some samples have no 'cls' label; the classifier needs class labels")
    return torch.stack(xs), y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dimscale.metrics.classifier", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the stand-in detector")
    t.add_argument("--out", required=True, help="output .safetensors")
    t.add_argument("--shards", default="", help="WebDataset shards with cls labels (default: Fashion-MNIST IDX)")
    t.add_argument("--idx", default="", help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    t.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from dimscale.metrics.sources import FASHION_MNIST, read_idx
    test = None
    if args.shards:
        x, y = _shard_arrays(args.shards, args.limit)
    else:
        folder = args.idx or FASHION_MNIST
        x, y = read_idx(folder, "train")
        x, y = x[:args.limit], y[:args.limit]
        test = read_idx(folder, "test")
    model = train_classifier(x, y, out=args.out, epochs=args.epochs, seed=args.seed, test=test,
                             num_classes=int(max(10, int(y.max()) + 1)))
    print(json.dumps({"out": args.out, **model.meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
