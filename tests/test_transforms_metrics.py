"""Image transforms (grey -> RGB, resize, normalise) and the locally shipped accuracy metric."""
import numpy as np
import torch
from PIL import Image
from transformers import ViTImageProcessor

from fedml_pfedseq.data.loading import load_image_dataset
from fedml_pfedseq.data.transforms import image_classification_transform
from fedml_pfedseq.training import accuracy_metric


def test_omniglot_grey_28px_becomes_normalised_rgb_32px_lazily():
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                  image_std=[0.2, 0.2, 0.2])
    ds = load_image_dataset("omniglot").select(range(4))
    assert ds[0]["image"].mode == "1" and ds[0]["image"].size == (28, 28)
    out = ds.with_transform(image_classification_transform(processor, "image", "alphabet"))[:4]
    assert out["pixel_values"].shape == (4, 3, 32, 32) and out["labels"].dtype == torch.long
    assert torch.equal(out["labels"], torch.tensor(ds["alphabet"]))
    # grey -> RGB copies the channel, so after normalisation channel c is (x - mean_c) / std_c of the same x
    x = out["pixel_values"][0]
    grey_from = [(x[c] * 0.2 + m) for c, m in enumerate([0.5, 0.4, 0.3])]
    assert torch.allclose(grey_from[0], grey_from[1], atol=1e-5) and torch.allclose(grey_from[1], grey_from[2],
                                                                                     atol=1e-5)
    # and matches resizing + normalising the RGB image by hand through the processor
    rgb = ds[0]["image"].convert("RGB").resize((32, 32), Image.BILINEAR)
    by_hand = (np.asarray(rgb, dtype=np.float32) / 255.0 - [0.5, 0.4, 0.3]) / 0.2
    assert np.allclose(x.permute(1, 2, 0).numpy(), by_hand, atol=1e-4)


def test_accuracy_metric_is_loaded_offline_and_counts_matches():
    metric = accuracy_metric()
    assert metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {"accuracy": 0.75}
    metric.add_batch(predictions=[0, 0], references=[0, 1])
    metric.add_batch(predictions=[5], references=[5])
    assert abs(metric.compute()["accuracy"] - 2 / 3) < 1e-12
