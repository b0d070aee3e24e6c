"""Benchmark: one pFedSeq round of a ViT-B/16-shaped federation on synthetic images, the last step of
``benchmarks/gpu_check.sh``: it needs no datasets, evaluate or FedML, so it runs on a GPU machine as that comes.
Prints numbers; asserts nothing.

A backbone of ViT-B/16's shapes with random weights (224 px, 12 layers, LoRA r = 8 on q and v: 24,576 entries per
layer) is written to a temporary folder and built as the simulator builds it (``federation.build_model``); one
client trains a local epoch on random images in the given precision; then pFedSeq's server (the shipped recipe,
L = 15) fills its history with synthetic updates and one full round is timed.

    python benchmarks/gpu_round.py --precision bf16
    python benchmarks/gpu_round.py --small            # a tiny ViT at 32 px: the CPU rehearsal of the same steps
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.federation import build_model, build_server
from fedml_pfedseq.models.seq_learner import cpu_kernels
from fedml_pfedseq.models.seq_learner.scan import kernel_status
from fedml_pfedseq.training import train_epochs

RECIPE = "recipes/omniglot_pfedseq.yaml"
CLASSES = 50  # an Omniglot drawer's alphabet size, as the shipped recipe's head


def random_backbone(folder: str, small: bool) -> int:
    """A ViT with random weights saved where ``model_args.model`` can name it; returns its image side."""
    shape = ({"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 128} if small else {"image_size": 224})  # ViTConfig's defaults are ViT-B/16's
    ViTForImageClassification(ViTConfig(**shape)).save_pretrained(folder)
    side = shape["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)
    return side


def synthetic_loader(images: int, side: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, side, side, generator=g), "labels": i % CLASSES} for i in range(images)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def uploads(server, round_idx: int) -> dict[int, dict]:
    """Each client's LoRA update: update-sized noise around a client offset, with its sample count."""
    g = torch.Generator().manual_seed(round_idx)
    out = {}
    for i in range(server.num_clients):
        delta = {k: 1e-3 * (torch.randn(v.shape, generator=g) + i / server.num_clients)
                 for k, v in server.global_state["lora"].items()}
        out[i] = {"client_id": i, "num_samples": 100, "lora": delta}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--small", action="store_true", help="a tiny ViT, 4 clients, L = 3 (CPU rehearsal)")
    parser.add_argument("--images", type=int, default=None, help="one client's training images (default 1,136: "
                        "a drawer's 70 %% of 1,623 drawings; 32 with --small)")
    args = parser.parse_args()
    clients, length = (4, 3) if args.small else (20, 15)
    images = args.images or (32 if args.small else 1136)
    with tempfile.TemporaryDirectory() as folder:
        side = random_backbone(folder, args.small)
        recipe = load_recipe(RECIPE, [f"model_args.model={folder}", f"device_args.mixed_precision={args.precision}",
                                      f"train_args.client_num_in_total={clients}",
                                      f"train_args.client_num_per_round={clients}",
                                      f"algorithm_args.seq_len={length}", "algorithm_args.warmup_rounds=1"])
        started = time.perf_counter()
        model = build_model(recipe, CLASSES)
        device = next(model.head.parameters()).device
        print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), "
              f"{args.precision}, {side} px; built in {time.perf_counter() - started:.1f} s")
        print(f"scan on CUDA tensors: {kernel_status()[1]}; on CPU tensors: {cpu_kernels.status()[1]}")
        loader = synthetic_loader(images, side, recipe.train_args.batch_size)
        for epoch in ("first (warm-up)", "second"):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            train_epochs(model, loader, 1, recipe.train_args.learning_rate)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                      if device.type == "cuda" else "")
            print(f"client epoch, {epoch}: {images} images in {seconds:.2f} s ({images / seconds:.0f} img/s){memory}")
        server = build_server(recipe, model, clients)
        server.initial_payloads()
        sizes = server.layout.sizes
        print(f"server: pFedSeq, {len(sizes)} layers x D = {sizes[0]:,}, N = {clients}, L = {length}, learner on "
              f"{server.device}")
        for t in range(1, length + 2):
            started = time.perf_counter()
            server.aggregate(uploads(server, t))
            if server.device.type == "cuda":
                torch.cuda.synchronize()
        print(f"server round {length + 1} (full history, calibrations sent): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
