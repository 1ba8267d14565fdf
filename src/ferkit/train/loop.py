"""The training loop: ``fit(cfg)`` as named steps, ``train_one_epoch`` and ``evaluate``. Lightning Fabric does the
plumbing (device placement, bf16 autocast, DDP across GPUs and machines, rank-zero I/O, checkpoint save/load)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ferkit.classes import FER2013_CLASSES, parse_classes
from ferkit.config import TrainConfig
from ferkit.fsutil import atomic_write_text
from ferkit.data import find_dataset, load_split
from ferkit.data.augment import BatchAugment
from ferkit.errors import ConfigError, DatasetError
from ferkit.evaluate import evaluate_probs, plot_curves, predict_logits, predict_probs, write_report
from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model
from ferkit.preprocess import DEFAULT_MEAN, DEFAULT_STD
from ferkit.train.distill import VIEWS_FILE, StoredViews

log = logging.getLogger(__name__)
MEAN, STD = DEFAULT_MEAN, DEFAULT_STD  # ferkit.preprocess owns the normalisation


#: Label of an unlabelled transfer image (distill_unlabeled): ignored by the hard-label loss and by accuracy.
IGNORE = -100


def make_fabric(cfg: TrainConfig):  # noqa: ANN201 - lightning is imported lazily
    from lightning.fabric import Fabric

    # Imported after the CLI configured logging, Lightning adds its own handler to "lightning" *and* lets records
    # reach ours: every info line would print twice.
    lightning_log = logging.getLogger("lightning")
    if lightning_log.handlers:
        lightning_log.propagate = False
    accel = cfg.device
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    accel = "gpu" if accel == "cuda" else accel
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accel == "gpu" else "32-true"
    elif precision == "bf16":
        precision = "bf16-mixed"
        if accel == "cpu" and not cpu_has_bf16():
            log.warning("precision=bf16: this CPU has no bf16 units that oneDNN uses (torch sees %s), so bf16 is "
                        "emulated and trains ~12x slower than precision=32 (vgg 2.4 vs 28.8 img/s on an AVX2 EPYC, "
                        "benchmarks/train_speed_avx2.json); use --set precision=32 (or auto) here",
                        torch.backends.cpu.get_cpu_capability())
    else:
        precision = "32-true" if precision == "32" else "16-mixed"
    multi = cfg.devices > 1 or cfg.num_nodes > 1
    return Fabric(
        accelerator=accel,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=precision,
        strategy="ddp" if multi else "auto",
    )


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16/AMX, or AVX-512 conversions), as torch reports it.
    Without it bf16 autocast is emulated: the AVX2 EPYC of the twelfth sitting trained 12x slower in bf16 than fp32,
    against 1.4-3.3x faster on the AVX512-BF16 and AMX CPUs of earlier ones."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def shard(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the epoch's permutation; every rank draws the same permutation, equal-sized shards."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per = n // world
    return perm[rank * per : (rank + 1) * per]


def show_progress(fabric) -> bool:  # noqa: ANN001 - lightning is imported lazily
    """Progress bars on rank zero, unless FERKIT_PROGRESS=0."""
    return fabric.is_global_zero and os.environ.get("FERKIT_PROGRESS", "1") != "0"


def train_one_epoch(
    fabric,
    model: nn.Module,
    opt,
    sched,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    augment: BatchAugment,
    loss_fn: nn.Module,
    teachers=None,
    step0: int = 0,
    ema=None,
    targets: torch.Tensor | None = None,
) -> dict:
    """One pass over this rank's shard of the training set (``ema``: an AveragedModel updated after every step;
    ``targets``: N×C vote distributions, when training on crowd labels). Returns mean loss and accuracy (this rank)."""
    model.train()
    idx = shard(len(labels), epoch, cfg.seed, fabric.global_rank, fabric.world_size)
    g = torch.Generator(device=images.device).manual_seed(cfg.seed * 7919 + epoch * 31 + fabric.global_rank)
    # Dropout draws from the global generator: seed it per epoch too, so a resumed run repeats the same epochs bit
    # for bit (the checkpoint then needs no RNG state, which differs per rank).
    torch.manual_seed(cfg.seed * 104_729 + epoch * 1_009 + fabric.global_rank)
    nb = max(1, len(idx) // cfg.batch_size)
    tot_loss = tot_ok = seen = seen_labelled = steps = 0
    bar = None
    if show_progress(fabric):
        from tqdm import tqdm

        bar = tqdm(total=nb, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    for b in range(nb):
        if cfg.max_steps and step0 + b >= cfg.max_steps:
            break
        j = idx[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(images.device)
        soft = None
        if isinstance(teachers, StoredViews):  # distill_views: a stored view per image, labelled once in advance
            x01, soft = teachers.batch(j, g, flip=cfg.view_flip)
        else:
            x01 = augment.unit(images[j], generator=g)
        x = augment.pre.normalise(x01)
        y = labels[j]
        t = None
        if targets is not None:
            t = targets[j]
            if cfg.label_mode == "probability":  # FER+'s PLD: each step draws a label from the face's votes
                drawn = torch.multinomial(t.clamp(min=0) + (t.sum(1, keepdim=True) <= 0).float(), 1, generator=g)
                y = torch.where(t.sum(1) > 0, drawn.squeeze(1), torch.full_like(y, IGNORE))
                t = None
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cfg.mixup > 0:  # mixup (Zhang et al. 2018): convex blend of two images and of their losses
            lam = float(np.random.default_rng(cfg.seed * 1_000_003 + step0 + b).beta(cfg.mixup, cfg.mixup))
            mix = torch.randperm(len(y), device=x.device, generator=g)
            x = lam * x + (1 - lam) * x[mix]
            out = model(x)
            if t is not None:
                loss = lam * soft_loss(out, t) + (1 - lam) * soft_loss(out, t[mix])
            else:
                loss = lam * hard_loss(loss_fn, out, y) + (1 - lam) * hard_loss(loss_fn, out, y[mix])
        else:
            out = model(x)
            loss = soft_loss(out, t) if t is not None else hard_loss(loss_fn, out, y)
        if teachers is not None:
            from ferkit.train.distill import distill_loss

            if soft is None:
                with fabric.autocast():  # teachers at the run's precision (bf16 roughly halves their cost on CPU too)
                    soft = teachers.logits(x01, cfg.distill_temp)
            loss = distill_loss(out, soft, loss, alpha=cfg.distill_alpha, temperature=cfg.distill_temp)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
        if ema is not None:
            ema.update_parameters(_unwrap(model))
        if sched is not None and cfg.schedule in ("onecycle", "cosine"):
            sched.step()
        with torch.no_grad():
            tot_loss += loss.item() * len(y)
            labelled = y >= 0  # unlabelled transfer images (distill_unlabeled) have no accuracy
            tot_ok += (out.argmax(1) == y)[labelled].sum().item()
            seen_labelled += int(labelled.sum().item())
            seen += len(y)
        steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{tot_ok / max(seen_labelled, 1):.3f}")
    if bar is not None:
        bar.close()
    return {"train_loss": tot_loss / max(seen, 1), "train_acc": tot_ok / max(seen_labelled, 1), "steps": steps,
            "images": seen}


def hard_loss(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The hard-label loss over the labelled images of a batch (zero, not NaN, when none is labelled)."""
    keep = y >= 0
    if bool(keep.all()):
        return loss_fn(out.float(), y)
    if not bool(keep.any()):
        return out.float().sum() * 0.0
    return loss_fn(out.float()[keep], y[keep])


def soft_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (FER+'s "crossentropy" mode), averaged over the rows that have a
    target (an all-zero row, e.g. an unlabelled transfer image, adds nothing; zero, not NaN, when none has)."""
    has = target.sum(1) > 0
    if not bool(has.any()):
        return out.float().sum() * 0.0
    logp = F.log_softmax(out.float()[has], 1)
    return -(target.float()[has] * logp).sum(1).mean()


def _unlabelled_images(cfg: TrainConfig, classes: list[str]) -> np.ndarray:
    """uint8 faces of the train split's other FER2013 expressions: the distillation transfer set."""
    others = [c for c in FER2013_CLASSES if c not in classes]
    empty = np.zeros((0, cfg.input_size, cfg.input_size), np.uint8)
    if not others:
        return empty
    try:
        ds = find_dataset(cfg.data, others, require_all=False)
    except DatasetError:
        return empty
    src = ds.splits.get("train") or ds.splits.get("single")
    if src is None or not len(src):
        return empty
    return load_split(src, cfg.input_size, strict=cfg.strict).images


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, tta: str = "none", batch_size: int = 512
) -> dict:
    """Loss and accuracy on a held-out split (run on every rank, same data, so all ranks agree)."""
    model.eval()
    probs = predict_probs(
        model, images, size=size, mean=MEAN, std=STD, tta=tta, batch_size=batch_size, device=images.device
    )
    y = labels.cpu()
    loss = F.nll_loss(torch.log(probs + 1e-8), y).item()
    acc = (probs.argmax(1) == y).float().mean().item()
    return {"val_loss": loss, "val_acc": acc, "probs": probs}


def _save_ckpt(fabric, path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state)
    if fabric.is_global_zero:
        os.replace(tmp, path)  # atomic: a kill mid-write never leaves a damaged last.ckpt
    fabric.barrier()


@dataclass
class Splits:
    """The arrays a run trains and validates on (uint8 faces, int labels; IGNORE marks unlabelled transfer images)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    val_name: str
    n_labelled: int
    skipped: list[str]
    from_cache: bool
    seconds: float = 0.0
    #: crowd labels (``cfg.labels``): training targets N×C, and every validation face with its votes (N×10) and its
    #: folder label among the run's classes (-1 if none), for the final vote and folder-label metrics
    train_t: np.ndarray | None = None
    val_all_x: np.ndarray | None = None
    val_all_votes: np.ndarray | None = None
    val_all_folder: np.ndarray | None = None
    label_summary: dict[str, Any] | None = None


@dataclass
class RunState:
    """What a checkpoint carries besides the weights, optimizer and scheduler: where the run is."""

    epoch: int = 0  # the next epoch to run (0-based)
    best_acc: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    stale: int = 0
    ema: dict[str, Any] | None = None  # the checkpoint's averaged weights (weight EMA), until make_ema takes them


def fit(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train a model as ``cfg`` says; writes the run directory and returns the final metrics.

    The steps, each a function below: data splits → model → optimizer → scheduler → loss, teachers and
    augmentation → resume state → epochs → final evaluation and calibration → the run directory.
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fabric = make_fabric(cfg)
    fabric.launch()
    fabric.seed_everything(cfg.seed, verbose=False)
    out, classes = Path(cfg.out), parse_classes(cfg.classes)
    data = load_splits(cfg, classes)
    announce_run(fabric, cfg, data, classes, resume)
    dev = fabric.device
    images = torch.from_numpy(np.ascontiguousarray(data.train_x)).to(dev)
    labels = torch.from_numpy(np.asarray(data.train_y)).to(dev)
    val_images = torch.from_numpy(np.ascontiguousarray(data.val_x)).to(dev)
    val_labels = torch.from_numpy(np.asarray(data.val_y)).to(dev)
    targets = torch.from_numpy(data.train_t).to(dev) if data.train_t is not None else None

    model = build_model(cfg, classes, fabric, init=not resume)
    opt = make_optimizer(cfg, model)
    if cfg.compile:  # worth it on a GPU for long runs; compile time dominates short CPU runs
        model = torch.compile(model)
    model, opt = fabric.setup(model, opt)
    total = max(1, (len(data.train_y) // fabric.world_size) // cfg.batch_size) * cfg.epochs
    sched = make_scheduler(cfg, opt, total)
    loss_fn = make_loss(cfg, labels, len(classes))
    teachers = make_teachers(cfg, classes, dev)
    augment = BatchAugment(cfg, MEAN, STD)
    if teachers is not None and cfg.distill_views:
        teachers = stored_views(fabric, cfg, teachers, images, augment)
    state = resume_run(fabric, cfg, model, opt, sched, total) if resume else RunState()
    ema = make_ema(fabric, cfg, model, state)

    t_train = time.perf_counter()
    images_seen = run_epochs(fabric, cfg, state, model, opt, sched, images, labels, val_images, val_labels,
                             augment, loss_fn, teachers, ema, targets)
    train_seconds = time.perf_counter() - t_train
    if cfg.rank_weights:  # every rank's final weights, to check that distributed ranks agree
        Path(cfg.rank_weights).mkdir(parents=True, exist_ok=True)
        _save_weights(model, Path(cfg.rank_weights) / f"rank{fabric.global_rank}.safetensors")

    raw = best_weights(fabric, model, out / "best.ckpt")
    final, plain, cal = final_evaluation(raw, cfg, val_images, data, classes)
    final_probs = final.pop("probs")
    crowd = label_metrics(raw, cfg, data, classes, cal, val_images.device)
    result = {
        "final": final,
        "plain_accuracy": plain["accuracy"],
        "tta": cfg.tta,
        "val_split": data.val_name,
        "best_epoch": int(max(state.history, key=lambda h: h.get("val_acc_ema", h["val_acc"]))["epoch"])
        if state.history else 0,
        "history": state.history,
        "train_seconds": train_seconds,
        "data_seconds": data.seconds,
        "total_seconds": time.perf_counter() - t_start,
        "skipped": len(data.skipped),
        "status": "done",
        "images_per_second": images_seen * fabric.world_size / max(train_seconds, 1e-9),
        "calibration": cal,
        **crowd,
    }
    if fabric.is_global_zero:
        write_run(fabric, out, cfg, raw, classes, data, plain, final, cal, result, final_probs)
    fabric.barrier()
    return result


def load_splits(cfg: TrainConfig, classes: list[str]) -> Splits:
    """The train and validation arrays: the dataset's validation split, else a deterministic 10% of train; plus the
    other expressions as unlabelled transfer images when ``distill_unlabeled`` asks for them."""
    if cfg.labels:
        return load_vote_splits(cfg, classes)
    t0 = time.perf_counter()
    ds = find_dataset(cfg.data, classes)
    tr_src = ds.splits.get("train") or ds.splits.get("single")
    if tr_src is None:
        raise ConfigError(f"{cfg.data}: no train/ split to train on (found: {', '.join(ds.splits)})")
    train = load_split(tr_src, cfg.input_size, strict=cfg.strict)
    val_name = cfg.val_split if cfg.val_split in ds.splits else None
    if val_name:
        val = load_split(ds.splits[val_name], cfg.input_size, strict=cfg.strict)
        tr_x, tr_y, va_x, va_y = train.images, train.labels, val.images, val.labels
        skipped = train.skipped + val.skipped
    else:  # no validation split: hold out a deterministic 10% of train
        perm = np.random.default_rng(cfg.seed).permutation(len(train))
        k = max(1, len(perm) // 10)
        va_i, tr_i = np.sort(perm[:k]), np.sort(perm[k:])
        tr_x, tr_y, va_x, va_y = train.images[tr_i], train.labels[tr_i], train.images[va_i], train.labels[va_i]
        skipped = train.skipped
        val_name = "train[10% held out]"
    n_labelled = len(tr_y)
    if cfg.distill_unlabeled:
        extra = _unlabelled_images(cfg, classes)
        if len(extra):
            tr_x = np.concatenate([tr_x, extra])
            tr_y = np.concatenate([np.asarray(tr_y), np.full(len(extra), IGNORE, np.asarray(tr_y).dtype)])
    return Splits(tr_x, np.asarray(tr_y), va_x, np.asarray(va_y), val_name, n_labelled, list(skipped),
                  train.from_cache, time.perf_counter() - t0)


def load_vote_splits(cfg: TrainConfig, classes: list[str]) -> Splits:
    """The splits for training on crowd votes (``cfg.labels``): every face of the dataset's expression folders
    (a "fear" folder face that people call neutral is a neutral face), targets from its votes
    (``data.labels.vote_targets``: left-out faces counted by reason), validated on the faces the FER+ majority rule
    keeps, with the majority label."""
    from ferkit.data.labels import attach_votes, majority_labels, read_votes, vote_targets

    t0 = time.perf_counter()
    table = read_votes(cfg.labels)
    ds = find_dataset(cfg.data, list(FER2013_CLASSES), require_all=False)
    tr_src = ds.splits.get("train") or ds.splits.get("single")
    if tr_src is None:
        raise ConfigError(f"{cfg.data}: no train/ split to train on (found: {', '.join(ds.splits)})")

    def faces(src) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], bool]:  # noqa: ANN001
        loaded = load_split(src, cfg.input_size, strict=cfg.strict)
        votes = loaded.take(attach_votes(table, src, ds.root))
        folder = np.array([classes.index(ds.classes[k]) if ds.classes[k] in classes else -1
                           for k in np.asarray(loaded.labels).tolist()], np.int64)
        return loaded.images, votes, folder, loaded.skipped, loaded.from_cache

    tr_x, tr_v, tr_f, skipped, from_cache = faces(tr_src)
    val_name = cfg.val_split if cfg.val_split in ds.splits else None
    if val_name:
        va_x, va_v, va_f, va_skipped, _ = faces(ds.splits[val_name])
        skipped = skipped + va_skipped
    else:  # no validation split: hold out a deterministic 10% of train
        perm = np.random.default_rng(cfg.seed).permutation(len(tr_x))
        k = max(1, len(perm) // 10)
        va_i, tr_i = np.sort(perm[:k]), np.sort(perm[k:])
        va_x, va_v, va_f = tr_x[va_i], tr_v[va_i], tr_f[va_i]
        tr_x, tr_v, tr_f = tr_x[tr_i], tr_v[tr_i], tr_f[tr_i]
        val_name = "train[10% held out]"
    tgt = vote_targets(tr_v, classes, cfg.label_mode, folder_labels=tr_f, missing=cfg.label_missing)
    maj = majority_labels(va_v, classes)
    if not tgt.keep.any():
        raise DatasetError(f"{cfg.labels}: no training face keeps a target for {', '.join(classes)} "
                           f"({tgt.summary()})")
    if not (maj >= 0).any():
        raise DatasetError(f"{cfg.labels}: no {val_name} face has a FER+ majority among {', '.join(classes)}")
    train_t = tgt.targets[tgt.keep]
    x, y = tr_x[tgt.keep], train_t.argmax(1).astype(np.int64)
    n_labelled = len(y)
    if cfg.distill_unlabeled:  # the left-out faces: teachers' soft labels only
        extra = tr_x[~tgt.keep]
        x, y = np.concatenate([x, extra]), np.concatenate([y, np.full(len(extra), IGNORE, np.int64)])
        train_t = np.concatenate([train_t, np.zeros((len(extra), len(classes)), np.float32)])
    summary = {"source": cfg.labels, "mode": cfg.label_mode, "missing": cfg.label_missing,
               "train_kept": n_labelled, "train_faces": int(len(tgt.keep)), "left_out": tgt.left_out,
               "from_folder": tgt.from_folder, "val_kept": int((maj >= 0).sum()), "val_faces": int(len(maj)),
               "text": tgt.summary()}
    return Splits(x, y, va_x[maj >= 0], maj[maj >= 0], val_name, n_labelled, list(skipped), from_cache,
                  time.perf_counter() - t0, train_t=train_t.astype(np.float32), val_all_x=va_x, val_all_votes=va_v,
                  val_all_folder=va_f, label_summary=summary)


def announce_run(fabric, cfg: TrainConfig, data: Splits, classes: list[str], resume: bool) -> None:
    """Rank zero: create the run directory, write config.yaml (a resumed run: once its checkpoint fits) and say
    what the run trains on."""
    if not fabric.is_global_zero:
        return
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _write_yaml(out / "config.yaml", cfg.to_dict())
    n_extra = len(data.train_y) - data.n_labelled
    fabric.print(
        f"data: {data.n_labelled} train / {len(data.val_y)} {data.val_name} images, classes {', '.join(classes)}"
        + (f", plus {n_extra} unlabelled for distillation" if n_extra else "")
        + f" ({'cached' if data.from_cache else 'decoded'} in {data.seconds:.1f}s)"
    )
    if data.label_summary:
        ls = data.label_summary
        fabric.print(f"labels: {ls['mode']} targets from the votes in {ls['source']}: {ls['text']}; validating on "
                     f"the {ls['val_kept']} of {ls['val_faces']} {data.val_name} faces with a FER+ majority")
    if data.skipped:
        fabric.print(f"skipped {len(data.skipped)} unreadable image(s); listed in {out / 'skipped.txt'}")
        atomic_write_text(out / "skipped.txt", "\n".join(data.skipped) + "\n")


def build_model(cfg: TrainConfig, classes: list[str], fabric, *, init: bool) -> nn.Module:
    """The architecture, optionally initialised from a trained model (``--init``; not on resume), channels-last."""
    model = create_model(cfg.model, num_classes=len(classes), in_chans=1, pretrained=cfg.pretrained)
    if cfg.init and init:
        _init_from(model, cfg, classes, fabric)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW; no weight decay on biases and BatchNorm parameters."""
    params = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int):  # noqa: ANN201 - torch's LR types
    """The learning-rate schedule over ``total`` optimizer steps (None for a constant rate)."""
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by zero when pct_start × total_steps is exactly 1 (0.2 × 5 steps): step off that point.
        pct = cfg.warmup_pct if abs(cfg.warmup_pct * total - 1) > 1e-6 else cfg.warmup_pct * 1.01
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=pct, div_factor=25, final_div_factor=1e3
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
    return None


def make_loss(cfg: TrainConfig, labels: torch.Tensor, n_classes: int) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing, class-weighted by inverse frequency if asked."""
    weight = None
    if cfg.class_weighting:
        counts = torch.bincount(labels[labels >= 0], minlength=n_classes).float().clamp(min=1)
        weight = (counts.sum() / (n_classes * counts)).to(labels.device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def make_teachers(cfg: TrainConfig, classes: list[str], device: torch.device):  # noqa: ANN201
    """The distillation teachers (``--teacher``), or None."""
    if not cfg.teacher:
        return None
    from ferkit.train.distill import Teachers

    teachers = Teachers(cfg.teacher, classes, device=device)
    return teachers.to(memory_format=torch.channels_last) if cfg.channels_last else teachers


def stored_views(fabric, cfg: TrainConfig, teachers, images: torch.Tensor, augment: BatchAugment):  # noqa: ANN001,ANN201
    """``distill_views``: the stored views of the run directory if they were made for this run, else made now (the
    teachers label every view once) and stored for a resume or a repeat."""
    path = Path(cfg.out) / VIEWS_FILE
    key = StoredViews.make_key(teachers, images, cfg)
    stored = StoredViews.load(path, key, device=images.device, views=cfg.distill_views)
    if stored is not None and stored.views == cfg.distill_views:
        fabric.print(f"teacher soft labels: {stored.views} stored views of {len(images)} faces from {path}")
        return stored
    t0 = time.perf_counter()
    views = StoredViews.build(teachers, images, augment, cfg, autocast=fabric.autocast, key=key,
                              progress=show_progress(fabric), base=stored)
    kept = f" ({stored.views} of them stored before)" if stored is not None else ""
    fabric.print(f"teacher soft labels: {views.views} views of {len(images)} faces{kept} in "
                 f"{time.perf_counter() - t0:.0f}s, stored in {path}")
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        views.save(path)
    return views


def resume_run(fabric, cfg: TrainConfig, model: nn.Module, opt, sched, total: int) -> RunState:
    """All of resuming: restore weights, optimizer, scheduler and run state from ``last.ckpt``, refuse a schedule
    that no longer fits, and only then rewrite config.yaml.

    Raises:
        ConfigError: no checkpoint, or settings that change the planned number of steps.
    """
    out = Path(cfg.out)
    ckpt_path = out / "last.ckpt"
    if not ckpt_path.exists():
        raise ConfigError(f"{ckpt_path}: nothing to resume (no last.ckpt in the run directory)")
    extra = fabric.load(ckpt_path, {"model": model, "optimizer": opt, "scheduler": sched})
    state = RunState(extra["epoch"] + 1, extra["best_acc"], extra["history"], extra["step"], extra.get("stale", 0),
                     extra.get("ema"))
    planned = getattr(sched, "total_steps", getattr(sched, "T_max", total))  # as restored from the checkpoint
    if planned != total:  # a one-cycle/cosine schedule cannot be stretched; it would fail at its last step
        raise ConfigError(
            f"--resume: {out} was planned for {planned} steps ({cfg.schedule} schedule), the settings now give "
            f"{total}; resume with the run's --epochs and --batch-size, or start a new run"
        )
    if fabric.is_global_zero:
        _write_yaml(out / "config.yaml", cfg.to_dict())
    fabric.print(f"resuming {out} from epoch {state.epoch + 1}/{cfg.epochs} (best so far {state.best_acc * 100:.2f}%)")
    return state


def make_ema(fabric, cfg: TrainConfig, model: nn.Module, state: RunState):  # noqa: ANN001,ANN201 - torch's types
    """Weight EMA (``cfg.ema``): torch's AveragedModel over the weights and the BatchNorm statistics, restored from
    the checkpoint on a resume; a resumed run that had none starts it from the restored weights. None when off."""
    if not cfg.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    if state.ema is not None:
        ema.load_state_dict(state.ema)
    elif state.epoch:
        fabric.print(f"weight EMA (decay {cfg.ema}) starts at epoch {state.epoch + 1}: the checkpoint had none")
    state.ema = None
    return ema


def run_epochs(fabric, cfg: TrainConfig, state: RunState, model: nn.Module, opt, sched, images: torch.Tensor,
               labels: torch.Tensor, val_images: torch.Tensor, val_labels: torch.Tensor, augment: BatchAugment,
               loss_fn: nn.Module, teachers, ema=None, targets: torch.Tensor | None = None) -> int:
    """Train from ``state.epoch`` to the end (or an early stop), validating, keeping the best weights in best.ckpt
    and a checkpoint in last.ckpt after every epoch. Updates ``state``; returns the number of images seen.

    With weight EMA (``ema``) both the trained and the averaged weights are validated (``val_acc``,
    ``val_acc_ema``); the averaged ones choose the best epoch and are the weights kept."""
    out = Path(cfg.out)
    images_seen = 0
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        tr = train_one_epoch(fabric, model, opt, sched, images, labels, cfg, epoch, augment, loss_fn, teachers,
                             state.step, ema, targets)
        state.step += tr.pop("steps")
        images_seen += tr.pop("images")
        ev = evaluate(model, val_images, val_labels, cfg.input_size)
        ev.pop("probs")
        if ema is not None:
            with fabric.autocast():  # at the run's precision, like the wrapped model's own validation
                ev_ema = evaluate(ema.module, val_images, val_labels, cfg.input_size)
            ev.update(val_loss_ema=ev_ema["val_loss"], val_acc_ema=ev_ema["val_acc"])
        kept_acc = ev["val_acc_ema"] if ema is not None else ev["val_acc"]
        if cfg.schedule == "plateau":
            sched.step(kept_acc)
        row = {"epoch": epoch + 1, **tr, **ev, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        state.history.append(row)
        improved = kept_acc > state.best_acc
        if improved:
            state.best_acc, state.stale = kept_acc, 0
            if fabric.is_global_zero:
                _save_weights(ema.module if ema is not None else model, out / "best.ckpt")
        else:
            state.stale += 1
        fabric.print(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {tr['train_loss']:.4f}  acc {tr['train_acc'] * 100:5.2f}%"
            f"  val_loss {ev['val_loss']:.4f}  val_acc {ev['val_acc'] * 100:5.2f}%"
            + (f"  ema {ev['val_acc_ema'] * 100:5.2f}%" if ema is not None else "")
            + f"{' *' if improved else ''}  {row['seconds']:.1f}s"
        )
        state.epoch = epoch + 1
        _save_ckpt(fabric, out / "last.ckpt", {
            "model": model, "optimizer": opt, "scheduler": sched, "epoch": epoch, "best_acc": state.best_acc,
            "history": state.history, "step": state.step, "stale": state.stale, "config": cfg.to_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {})})
        if fabric.is_global_zero:
            atomic_write_text(out / "metrics.json",
                              json.dumps({"history": state.history, "status": "running"}, indent=2) + "\n")
        if cfg.max_steps and state.step >= cfg.max_steps:
            fabric.print("stopping early: max_steps reached")
            break
        if cfg.early_stop and state.stale >= cfg.early_stop:
            fabric.print(f"stopping early: no improvement for {state.stale} epochs")
            break
    return images_seen


def best_weights(fabric, model: nn.Module, best_path: Path) -> nn.Module:
    """The bare network with the best validation epoch's weights (the last epoch's if none was saved)."""
    raw = fabric.to_device(_unwrap(model))
    if best_path.exists():
        from safetensors.torch import load_file

        raw.load_state_dict(load_file(str(best_path)))
    return raw


def final_evaluation(raw: nn.Module, cfg: TrainConfig, val_images: torch.Tensor, data: Splits, classes: list[str]
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Plain and TTA metrics of the best weights on the validation split, and the calibration fitted there.

    The calibration (``train.calibrate``) is fitted on the validation split, which also chose the best epoch; its
    ECE is reported by 2-fold cross-fitting, so the quoted number comes from faces the fit did not see.
    """
    from ferkit.train.calibrate import calibrate

    logits = predict_logits(raw, val_images, size=cfg.input_size, mean=MEAN, std=STD, device=val_images.device)
    cal = calibrate(logits.numpy(), data.val_y, split=data.val_name)
    meta = ModelMeta(arch=cfg.model, classes=tuple(classes), temperature=cal["temperature"],
                     temperature_poly=tuple(cal["temperature_poly"]))
    kw = dict(size=cfg.input_size, mean=MEAN, std=STD, device=val_images.device, calibration=meta)
    plain = evaluate_probs(predict_probs(raw, val_images, **kw), data.val_y, classes)
    final_probs = predict_probs(raw, val_images, tta=cfg.tta, **kw)
    final = evaluate_probs(final_probs, data.val_y, classes)
    final["probs"] = final_probs.numpy()  # for the run's reliability and coverage plots; not written to JSON
    return final, plain, cal


def label_metrics(raw: nn.Module, cfg: TrainConfig, data: Splits, classes: list[str], cal: dict[str, Any],
                  device: torch.device) -> dict[str, Any]:
    """With crowd labels: the calibrated model on every validation face, scored against the votes
    (``data.labels.vote_metrics``: FER+ majority accuracy, soft agreement, cross-entropy, ECE) and against the
    folder labels (the faces whose folder is one of the run's classes). Empty without crowd labels."""
    if data.val_all_x is None:
        return {}
    from ferkit.data.labels import vote_metrics

    meta = ModelMeta(arch=cfg.model, classes=tuple(classes), temperature=cal["temperature"],
                     temperature_poly=tuple(cal["temperature_poly"]))
    probs = predict_probs(raw, data.val_all_x, size=cfg.input_size, mean=MEAN, std=STD, device=device,
                          calibration=meta).numpy()
    folder = data.val_all_folder
    k = folder >= 0
    return {"ferplus": vote_metrics(probs, data.val_all_votes, classes, folder=folder),
            "accuracy_folder": float((probs[k].argmax(1) == folder[k]).mean()) if k.any() else float("nan"),
            "n_folder": int(k.sum()), "labels": data.label_summary}


def write_run(fabric, out: Path, cfg: TrainConfig, raw: nn.Module, classes: list[str], data: Splits,
              plain: dict[str, Any], final: dict[str, Any], cal: dict[str, Any], result: dict[str, Any],
              final_probs: np.ndarray | None = None) -> None:
    """Rank zero: model.safetensors (+ .json), metrics.json, confusion matrix and curves; one closing line."""
    meta = ModelMeta(
        arch=cfg.model,
        classes=tuple(classes),
        input_size=cfg.input_size,
        in_chans=1,
        mean=MEAN,
        std=STD,
        temperature=cal["temperature"],
        temperature_poly=tuple(cal["temperature_poly"]),
        name=out.name,
        training={
            "recipe": cfg.recipe,
            "data": str(cfg.data),
            "epochs": len(result["history"]),
            "best_epoch": result["best_epoch"],
            "train_images": int(data.n_labelled),
            **({"unlabelled_images": int(len(data.train_y) - data.n_labelled)}
               if len(data.train_y) > data.n_labelled else {}),
            "teacher": cfg.teacher or None,
            "seconds": round(result["total_seconds"], 1),
            **({"labels": {k: v for k, v in data.label_summary.items() if k != "text"}} if data.label_summary
               else {"labels": {"source": "folder names", "mode": "hard"}}),
        },
        metrics={
            "val_split": data.val_name,
            "accuracy": plain["accuracy"],
            "macro_f1": plain["macro_f1"],
            f"accuracy_tta_{cfg.tta}": final["accuracy"],
            "n": final["n"],
            "calibration": cal,
            # which truth "accuracy" measures: the FER+ majority label where the run trained on votes
            "labels": "ferplus-majority" if data.label_summary else "folder",
            **({"ferplus": result["ferplus"], "accuracy_folder": result["accuracy_folder"],
                "n_folder": result["n_folder"]} if "ferplus" in result else {}),
        },
    )
    save_model(out / "model.safetensors", raw, meta)
    write_report(final, out, title=f"{cfg.model} on {data.val_name}: {final['accuracy'] * 100:.2f}% (tta {cfg.tta})",
                 probs=final_probs, labels=data.val_y)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    if result["history"]:
        plot_curves(result["history"], out / "curves.png")
    ece = f"ECE {cal['before']['ece']:.4f} -> {cal['after_cross_fit']['ece']:.4f}"
    if "ferplus" in result:
        fp = result["ferplus"]
        fabric.print(f"against people (FER+ votes): majority accuracy {fp['accuracy'] * 100:.2f}% (n={fp['n']}), "
                     f"soft agreement {fp['soft_agreement'] * 100:.2f}%, cross-entropy {fp['cross_entropy']:.4f}; "
                     f"against the folder labels {result['accuracy_folder'] * 100:.2f}% (n={result['n_folder']})")
    fabric.print(
        f"done: {data.val_name} accuracy {plain['accuracy'] * 100:.2f}% (tta {cfg.tta}: "
        f"{final['accuracy'] * 100:.2f}%), macro-F1 {final['macro_f1'] * 100:.2f}%, {result['total_seconds']:.0f}s; "
        f"calibrated ({cal['method']}, {ece} cross-fitted); model in {out / 'model.safetensors'}"
    )


def _init_from(model: nn.Module, cfg: TrainConfig, classes: list[str], fabric) -> None:
    """Fine-tuning: copy a trained model's weights; rows of the classifier are matched by class name."""
    from ferkit.modelfile import load_model

    from ferkit.models.ensemble import tta_inner

    src, meta = load_model(cfg.init)
    if tta_inner(meta.arch) == cfg.model:  # a model with built-in TTA (fer7-large): train the network inside
        src = src.net
    elif meta.arch != cfg.model:
        use = tta_inner(meta.arch) or meta.arch
        raise ConfigError(
            f"--set init={cfg.init}: it is a '{meta.arch}' model, not '{cfg.model}' (use --model {use})"
        )
    state = src.state_dict()
    if (
        list(meta.classes) != classes
    ):  # output layer: copy the rows of classes both models know, fresh init for the rest
        own = model.state_dict()
        last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        for k in (f"{last}.weight", f"{last}.bias"):
            rows = own[k].clone()
            for i, c in enumerate(classes):
                if c in meta.classes:
                    rows[i] = state[k][list(meta.classes).index(c)]
            state[k] = rows
    model.load_state_dict(state)
    fabric.print(f"initialised from {cfg.init} ({meta.arch}, classes {', '.join(meta.classes)})")


def _unwrap(model: nn.Module) -> nn.Module:
    m = getattr(model, "module", model)  # Fabric wrapper
    m = getattr(m, "module", m)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {
        k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
        for k, v in _unwrap(model).state_dict().items()
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def _write_yaml(path: Path, d: dict) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
