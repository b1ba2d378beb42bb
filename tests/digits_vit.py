"""A small ViT trained on real images: scikit-learn's handwritten digits.

scikit-learn ships 1797 real 8x8 grey-scale scans of handwritten digits
(UCI "Optical Recognition of Handwritten Digits"). They are written out as PNG
files in an ImageFolder tree (``train/<digit>/*.png``, ``test/<digit>/*.png``,
a seeded 80/20 split) and a ViT is trained on them through its own image
processor (upsampled to 32x32, RGB, normalised), then saved with
``save_pretrained``: a real, genuinely trained image classifier for the tests
and for ``bench/vit_digits.py``. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32


def write_digits(root: str | Path, seed: int = 0, test_share: float = 0.2) -> tuple[Path, Path]:
    """``(train_dir, test_dir)``: the digits as PNG files, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_test = int(len(order) * test_share)
    for split, idx in (("test", order[:n_test]), ("train", order[n_test:])):
        for i in idx:
            folder = root / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root / "train", root / "test"


def processor():
    from PIL import Image
    import transformers

    # the PIL backend (transformers >= 5 without torchvision), else the classic class
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                             resample=Image.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def train_vit(out: str | Path, train_dir: str | Path, epochs: int = 30, seed: int = 0, hidden: int = 64,
              layers: int = 4, heads: int = 4, lr: float = 2e-3, batch: int = 64, patch: int = 8,
              distilled: bool = False) -> Path:
    """Train a ViT (or a DeiT with its distillation token, ``distilled``) on
    ``train_dir`` and save it with its processor in ``out``."""
    import transformers

    from d2prune.evaluation.vision import image_folder, pixel_values

    torch.manual_seed(seed)
    folder = image_folder(train_dir)
    proc = processor()
    x = pixel_values(proc, folder.paths)
    y = torch.tensor(folder.class_index)
    classes = list(folder.classes)
    kw = dict(image_size=IMAGE_SIZE, patch_size=patch, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=len(classes),
              id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    if distilled:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**kw))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**kw))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch):
            idx = perm[s:s + batch]
            logits = model(pixel_values=x[idx]).logits
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out
