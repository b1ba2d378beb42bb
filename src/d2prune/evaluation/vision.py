"""Image classifiers (ViT, DeiT, ...) through the same engine (docs/method.md §9).

Nothing here prunes: the engine, the methods and D²Prune's q/k/v choice are
the language models' own (a ViT block is found like a decoder block, its
``query`` / ``key`` / ``value`` Linears are q / k / v). What differs is data:

* images come from an ImageFolder (ImageNet) layout, ``DIR/<class>/<image>``;
  a class folder's label is the model's ``label2id`` entry when every folder
  name is one of its labels, else the folder's index in sorted order (an
  ImageNet train / val tree named by WordNet ids sorts into the standard
  class indices);
* pixels are made by the model's own image processor (``AutoImageProcessor``:
  its resize, centre crop and normalisation, i.e. the evaluation transform it
  was trained with), never by a transform of ours;
* calibration draws ``--nsamples`` images with the seed (one shuffle of the
  file list: the first N calibrate, the next ones are the held-out images
  ``--frozen auto`` scores its candidates on by cross-entropy);
* evaluation is top-1 (and top-5 when there are >= 5 classes) accuracy.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.sequential import model_forward, sequential_logits
from ..io.source import BlockSource
from ..errors import D2PruneError, first_line
from ..io.modeling import pick_device

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PROCESS_BATCH = 64  # images decoded and processed at once (bounded host memory on ImageNet-sized folders)


# --------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class ImageFolder:
    """The images of an ImageFolder tree in sorted order, each with its class
    folder's index into ``classes`` (sorted folder names)."""

    root: str
    paths: tuple[Path, ...]
    class_index: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def labels(self, label2id: dict | None, num_labels: int) -> tuple[list[int], str]:
        """Each image's label for a classifier with ``num_labels`` outputs, and
        how it was decided (``label2id`` or ``sorted folders``)."""
        table = {str(k): int(v) for k, v in (label2id or {}).items()}
        if table and all(c in table for c in self.classes):
            mapping, how = [table[c] for c in self.classes], "label2id"
        else:
            if len(self.classes) > num_labels:
                raise D2PruneError(
                    f"{self.root} has {len(self.classes)} class folders but the model classifies {num_labels} classes, "
                    "and the folder names are not its label2id labels: give a folder per model class")
            mapping, how = list(range(len(self.classes))), "sorted folders"
        return [mapping[c] for c in self.class_index], how


def image_folder(path: str | Path, what: str = "--calib-images") -> ImageFolder:
    """List ``path``'s ``<class>/<image>`` files (checked before any model loads)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise D2PruneError(f"{what} {path} is not a folder: give an ImageFolder tree (one sub-folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise D2PruneError(f"{what} {path} has no class sub-folders: lay images out as {path}/<class>/<image>")
    paths, index = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                index.append(k)
    if not paths:
        raise D2PruneError(f"{what} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ImageFolder(str(path), tuple(paths), tuple(index), tuple(classes))


def pixel_values(processor, paths: list[Path] | tuple[Path, ...], desc: str = "images") -> Tensor:
    """``[n, C, H, W]`` float32 pixels of ``paths`` through the model's own processor."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for s in tqdm(range(0, len(paths), PROCESS_BATCH), desc=desc, leave=False, disable=None):
        images = []
        for p in paths[s:s + PROCESS_BATCH]:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise D2PruneError(f"cannot read image {p}: {first_line(e)}: remove or replace it") from e
        out.append(processor(images=images, return_tensors="pt")["pixel_values"].float())
    return torch.cat(out)


def _num_labels(model: nn.Module) -> tuple[dict | None, int]:
    config = model.config
    return getattr(config, "label2id", None), int(getattr(config, "num_labels", 0) or len(config.id2label))


# --------------------------------------------------------------------------- calibration
@dataclass
class ImageCalibration:
    """Calibration pixels ``[N, C, H, W]`` and the held-out images (with labels)."""

    pixels: Tensor
    heldout: Tensor | None
    heldout_labels: Tensor | None
    label_source: str
    images: int  # images in the folder


def calibration_images(model: nn.Module, processor, folder: ImageFolder, nsamples: int, seed: int = 0,
                       heldout: int = 0) -> ImageCalibration:
    """``nsamples`` images drawn with ``seed`` (one shuffle of the sorted file
    list, so the draw does not depend on the file system's order), and the
    next ``heldout`` images of the same shuffle with their labels."""
    need = nsamples + heldout
    if need > len(folder):
        extra = f" + {heldout} held-out" if heldout else ""
        raise D2PruneError(f"--calib-images {folder.root} has {len(folder)} images, fewer than --nsamples {nsamples}"
                           f"{extra}: lower --nsamples" + (" / --heldout-windows" if heldout else ""))
    order = list(range(len(folder)))
    random.Random(seed).shuffle(order)
    label2id, n_labels = _num_labels(model)
    labels, how = folder.labels(label2id, n_labels)
    calib = pixel_values(processor, [folder.paths[i] for i in order[:nsamples]], "calibration images")
    held = held_labels = None
    if heldout:
        idx = order[nsamples:need]
        held = pixel_values(processor, [folder.paths[i] for i in idx], "held-out images")
        held_labels = torch.tensor([labels[i] for i in idx])
    log.info("calibration: %d of the %d images of %s (labels from %s)", nsamples, len(folder), folder.root, how)
    return ImageCalibration(calib, held, held_labels, how, len(folder))


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class AccuracyResult:
    dataset: str
    top1: float
    top5: float | None  # None with fewer than 5 classes
    mean_loss: float    # cross-entropy of the true label
    images: int         # images evaluated
    total_images: int   # images in the folder
    label_source: str

    def __str__(self) -> str:
        top5 = f", top-5 {self.top5:.4f}" if self.top5 is not None else ""
        part = "" if self.images == self.total_images else f", first {self.images}/{self.total_images} images"
        return f"{self.dataset} top-1 {self.top1:.4f}{top5} (loss {self.mean_loss:.4f}{part})"


def image_loss(logits: Tensor, labels: Tensor) -> float:
    """Summed cross-entropy of the true labels, in fp32."""
    return float(F.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum"))


@torch.no_grad()
def accuracy(model: nn.Module, pixels: Tensor, labels: Tensor, dataset: str = "images",
             device: str | torch.device | None = None, source: BlockSource | None = None, batch: int = 32,
             total: int | None = None, label_source: str = "") -> AccuracyResult:
    """Top-1 / top-5 accuracy of ``model`` on ``pixels`` with ``labels``: the
    whole model in batches when it is on ``device`` (or the CPU), else block by
    block through the engine (as :func:`d2prune.evaluation.perplexity.perplexity` does)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    param = next(model.parameters())
    sequential = (source is not None and source.compute_dtype is not None) or not (dev.type == "cpu" or param.device == dev)
    model.eval()
    logits: list[Tensor] = []
    if sequential:
        sequential_logits(model, pixels, dev, lambda j, lg: logits.append(lg.float().cpu()), source)
    else:
        for s in tqdm(range(0, pixels.shape[0], batch), desc=f"accuracy {dataset}", leave=False, disable=None):
            x = pixels[s:s + batch].to(param.device, param.dtype)
            logits.append(model_forward(model, x).logits.float().cpu())
    out = torch.cat(logits)
    k = min(5, out.shape[1])
    top = out.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    n = labels.numel()
    top5 = float(hit.any(1).float().mean()) if out.shape[1] >= 5 else None
    return AccuracyResult(dataset, float(hit[:, 0].float().mean()), top5, image_loss(out, labels) / n, n,
                          total if total is not None else n, label_source)


def evaluate_images(model: nn.Module, processor, folder: ImageFolder, max_images: int | None = None,
                    device: str | torch.device | None = None, source: BlockSource | None = None) -> AccuracyResult:
    """Accuracy on an ImageFolder tree (the first ``max_images`` in sorted order)."""
    if max_images is not None and max_images < 1:
        raise D2PruneError(f"--eval-windows {max_images} must be >= 1")
    label2id, n_labels = _num_labels(model)
    labels, how = folder.labels(label2id, n_labels)
    n = min(len(folder), max_images or len(folder))
    pixels = pixel_values(processor, folder.paths[:n], "evaluation images")
    result = accuracy(model, pixels, torch.tensor(labels[:n]), Path(folder.root).name or "images", device, source,
                      total=len(folder), label_source=how)
    log.info("%s", result)
    return result


def tokens_per_image(model: nn.Module) -> int:
    """An upper bound of the sequence length a ViT-like block sees (patches,
    the class token and a distillation token): for the memory estimate."""
    c = model.config
    size, patch = getattr(c, "image_size", 224), getattr(c, "patch_size", 16)
    size = size if isinstance(size, int) else max(size)
    patch = patch if isinstance(patch, int) else min(patch)
    return (size // patch) ** 2 + 2
