"""Pretrain the small ViT backbone on CIFAR-10's train split, on CPU, resumably.

No ImageNet-pretrained ViT can be downloaded here, so every offline recipe uses this backbone as the frozen F*.
It sees CIFAR-10's 50,000 training images only; the test split is read once, at the end, to measure accuracy
(no checkpoint is selected on it). The result is a plain ``ViTForImageClassification`` + ``ViTImageProcessor``
directory that ``from_pretrained`` loads like any Hub id.

    python scripts/pretrain_vit.py --out hf_models/vit-small-cifar10 --epochs 45

Checkpoints go to ``--checkpoint-dir`` after every epoch (atomic replace); rerunning the same command resumes.
The model card (``README.md`` beside the weights and ``cards/<name>.md``) is generated from the run's report.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from backbone_card import write_backbone_card  # beside this script
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from fedml_pfedseq.data.loading import load_image_dataset

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "vit-small-cifar10")
    p.add_argument("--checkpoint-dir", type=Path, default=Path(__file__).parent / "checkpoints")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=45)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train/test images (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def decode_split(split: str, data_dir, limit, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a CIFAR-10 split once into uint8 images [n, 3, 32, 32] and int64 labels [n].

    ``limit`` keeps a seeded random subset: the parquet files are sorted by label, so a prefix is one class.
    """
    ds = load_image_dataset("cifar10", split=split, data_dir=data_dir)
    if limit is not None:
        ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    images = np.stack([np.asarray(img.convert("RGB")) for img in tqdm(ds["image"], desc=f"decode {split}")])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds["label"])


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4) and horizontal flip, per image, on a normalised batch [b, 3, h, w]."""
    b, _, h, w = batch.shape
    padded = F.pad(batch, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    crops = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), crops.flip(-1), crops)


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + np.cos(np.pi * progress))


@torch.no_grad()
def evaluate_accuracy(model, images, labels, batch_size: int, device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size]).to(device)
        correct += (model(pixel_values=x).logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
        num_labels=10,
        id2label={i: n for i, n in enumerate(
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])},
    )
    config.label2id = {n: i for i, n in config.id2label.items()}
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    train_x, train_y = decode_split("train", args.data_dir, args.limit, args.seed)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    history, start_epoch, elapsed = [], 0, 0.0

    ckpt_path = args.checkpoint_dir / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed_s"]
        accelerator.print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, args.warmup_epochs * steps_per_epoch, args.lr)
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(normalise(train_x[idx]), generator).to(accelerator.device)
            y = train_y[idx].to(accelerator.device)
            logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            seen += len(idx)
            correct += (logits.argmax(-1) == y).sum().item()
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        elapsed += time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "seconds": time.time() - t0})
        accelerator.print(json.dumps(history[-1]))
        save_checkpoint(ckpt_path, {
            "model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch": epoch + 1, "history": history, "elapsed_s": elapsed, "args": vars(args)})

    test_x, test_y = decode_split("test", args.data_dir, args.limit, args.seed)
    test_accuracy = evaluate_accuracy(model, test_x, test_y, 512, accelerator.device)
    accelerator.print(f"CIFAR-10 test accuracy: {test_accuracy:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    accelerator.unwrap_model(model).save_pretrained(args.out)
    ViTImageProcessor(
        do_resize=True, size={"height": args.image_size, "width": args.image_size},
        image_mean=CIFAR10_MEAN, image_std=CIFAR10_STD,
    ).save_pretrained(args.out)
    report = {
        "cifar10_test_accuracy": test_accuracy, "test_images": len(test_x), "train_images": len(train_x),
        "epochs": args.epochs, "train_seconds": round(elapsed, 1), "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
        "args": {k: str(v) for k, v in vars(args).items()}, "history": history,
    }
    (args.out / "pretraining_report.json").write_text(json.dumps(report, indent=2))
    accelerator.print(f"model card: {write_backbone_card(args.out)}")
    return report


if __name__ == "__main__":
    main()
