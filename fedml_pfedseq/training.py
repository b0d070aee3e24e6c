"""Local training and evaluation: the one implementation every engine (simulator, FedML) and method calls."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch.utils.data import DataLoader

from fedml_pfedseq.adapter_model import AdapterModel

if TYPE_CHECKING:
    import evaluate

ACCURACY_METRIC_DIR = Path(__file__).parent / "metrics" / "accuracy"


def select_device(using_gpu: bool = True) -> torch.device:
    """This process's device: the accelerator accelerate picks for it (its local rank's GPU) when the recipe allows
    one, else the CPU. accelerate's state is one per process, so it is asked only for the accelerator: a recipe
    that says CPU never fixes the answer for a later one that allows a GPU."""
    return PartialState().device if using_gpu else torch.device("cpu")


@lru_cache(maxsize=1)
def accuracy_metric() -> evaluate.EvaluationModule:
    import evaluate  # here: servers and the GPU check, which never evaluate, run where evaluate is not installed

    return evaluate.load(str(ACCURACY_METRIC_DIR))


def loader_workers(device_args) -> int:
    """``device_args.loader_workers``, or by default 4 worker processes where a CUDA device trains (so decoding
    and collating overlap its steps; capped by the cores) and none on the CPU, where they would take its cores."""
    if device_args.loader_workers is not None:
        return device_args.loader_workers
    return min(4, os.cpu_count() or 1) if device_args.using_gpu and torch.cuda.is_available() else 0


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0) -> DataLoader:
    """Batches of ``dataset``, shuffled by ``seed`` in this process (so ``workers`` processes give the same
    batches as none); in page-locked memory where a GPU will read them."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def loss_scaler(model: AdapterModel) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling (a step whose gradients overflow is skipped and the scale lowered); for every
    other precision a pass-through, so fp32 and bf16 steps are the plain ones bit for bit."""
    return torch.amp.GradScaler(model.head.weight.device.type, enabled=model.precision == "fp16")


def train_epochs(
    model: AdapterModel,
    loader: DataLoader,
    epochs: int,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    parameters: list[torch.nn.Parameter] | None = None,
    extra_loss: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
) -> dict[str, float]:
    """SGD on ``parameters`` (default: every trainable one, i.e. LoRA + head) for ``epochs`` passes.

    ``extra_loss(logits, batch)`` is added to the cross-entropy of each batch: a method's regulariser (a proximal
    term, a distillation loss). ``train_loss`` reports the cross-entropy alone."""
    device = next(model.head.parameters()).device
    params = parameters if parameters is not None else model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    scaler = loss_scaler(model)
    model.train()
    seen, loss_sum = 0, 0.0
    for _ in range(epochs):
        for batch in loader:
            logits = model(batch["pixel_values"].to(device))
            loss = F.cross_entropy(logits, batch["labels"].to(device))
            objective = loss if extra_loss is None else loss + extra_loss(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(batch["labels"])
            loss_sum += loss.item() * len(batch["labels"])
    if seen and not torch.isfinite(torch.tensor(loss_sum)):
        raise FloatingPointError(f"local training diverged (loss {loss_sum / seen}); lower train_args.learning_rate")
    return {"train_loss": loss_sum / max(seen, 1)}


@contextmanager
def requires_grad(params: list[torch.nn.Parameter], flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` of ``params`` inside the block, then restore each one's own flag.

    Freezing a phase's other parameters this way (FedRep, pFedLoRA) keeps autograd from computing their
    gradients at all, as the reference codes do."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, old in zip(params, flags, strict=True):
            p.requires_grad_(old)


def proximal_term(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * sum ||p - a||^2: keeps personalized parameters near fixed anchors (Ditto, PerAda, pFedMe)."""
    return 0.5 * mu * sum(((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors, strict=True))


@torch.no_grad()
def evaluate_model(model: AdapterModel, loader: DataLoader) -> dict[str, float]:
    """Accuracy (through ``evaluate``), mean cross-entropy and sample count on one split."""
    device = next(model.head.parameters()).device
    model.eval()
    metric = accuracy_metric()
    loss_sum, seen = 0.0, 0
    for batch in loader:
        logits = model(batch["pixel_values"].to(device))
        labels = batch["labels"].to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        seen += len(labels)
        metric.add_batch(predictions=logits.argmax(-1).cpu().tolist(), references=labels.cpu().tolist())
    if seen == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0}
    return {"accuracy": metric.compute()["accuracy"], "loss": loss_sum / seen, "samples": seen}
