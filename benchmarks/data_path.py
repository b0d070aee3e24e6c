"""Images per second of the data path alone (no model): the lazy transform on every epoch against the tensors kept
once per client (``data_args.preprocess``), through the loader the clients train with.

    python benchmarks/data_path.py --size 224 --images 1024 --epochs 2

The images are the first ``--images`` drawings of the embedded Omniglot, passed through the committed backbone's
processor resized to ``--size`` px (224: the paper's ViT-B/16 input). The one-time cost of keeping the tensors
(transform and write to datasets' cache, a fresh temporary one) is reported on its own line; the epochs after it
only read. Prints a table; nothing is written outside the temporary cache.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image side after the processor's resize (px)")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="pfedseq-data-path-")  # before datasets is imported

    import torch

    from fedml_pfedseq.adapter_model import load_image_processor
    from fedml_pfedseq.console import quiet_libraries
    from fedml_pfedseq.data.federated import transformed
    from fedml_pfedseq.data.loading import load_image_dataset
    from fedml_pfedseq.data.transforms import image_classification_transform
    from fedml_pfedseq.results import format_table
    from fedml_pfedseq.training import make_loader

    torch.set_num_threads(args.threads)
    quiet_libraries()
    processor = load_image_processor("vit-small-cifar10")
    processor.size = {"height": args.size, "width": args.size}
    images = load_image_dataset("omniglot").select(range(args.images))
    transform = image_classification_transform(processor, "image", "alphabet")

    def epochs(dataset) -> list[float]:
        rates = []
        for epoch in range(args.epochs):
            started, seen = time.perf_counter(), 0
            for batch in make_loader(dataset, args.batch_size, shuffle=True, seed=epoch):
                seen += len(batch["labels"])
            rates.append(seen / (time.perf_counter() - started))
        return rates

    rows = [["lazy: transform on every access", "", *(f"{r:.0f}" for r in epochs(transformed(images, transform,
                                                                                                False)))]]
    started = time.perf_counter()
    kept = transformed(images, transform, True)
    once = time.perf_counter() - started
    rows.append(["kept: transform once, then read", f"{once:.1f} s ({args.images / once:.0f} img/s)",
                 *(f"{r:.0f}" for r in epochs(kept))])
    print(f"{args.images} Omniglot images at {args.size} px, batch {args.batch_size}, {args.threads} torch thread(s)")
    print(format_table(["data path", "one-time transform", *(f"epoch {e + 1} (img/s)" for e in range(args.epochs))],
                       rows))


if __name__ == "__main__":
    main()
