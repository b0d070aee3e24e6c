"""Write the backbone's model card from its pretraining report (the numbers are read, never typed in).

    python scripts/backbone_card.py hf_models/vit-small-cifar10

writes ``<model dir>/README.md`` (the Hub's place for a card) and ``cards/<model name>.md``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"


def backbone_card(model_dir: Path) -> ModelCard:
    report = json.loads((model_dir / "pretraining_report.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    args = report["args"]
    accuracy = report["cifar10_test_accuracy"]
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
        tags=["vit", "cifar10", "federated-learning", "pfedseq"], datasets=["cifar10"],
        model_name=model_dir.name,
    )
    tokens = (config["image_size"] // config["patch_size"]) ** 2
    size = config["image_size"]
    shape = ", ".join(str(config[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size"))
    lora = 4 * 8 * config["hidden_size"]
    history = report["history"]
    content = f"""---
{data.to_yaml()}
---

# {model_dir.name}

A small `ViTForImageClassification` pretrained from scratch on CIFAR-10, used by fedml-pfedseq as the frozen
backbone F* of every offline recipe. No ImageNet-pretrained ViT can be downloaded where this project is built, so
the project trains its own; where a network exists, recipes can name any Hub ViT (the paper used
`google/vit-base-patch16-224-in21k`) instead.

## Architecture
| | |
|---|---|
| input | {size}x{size} RGB, patch {config["patch_size"]} ({tokens} tokens + [CLS]) |
| hidden size, layers, heads, MLP | {shape} |
| parameters | {report["parameters"]:,} |
| LoRA (q_proj, v_proj, r=8) per layer | D = 4 * 8 * {config["hidden_size"]} = {lora:,} parameters |

## What it saw
- Training: CIFAR-10's official train split, all {report["train_images"]:,} images (JPEG copies, ../shared/data),
  with random crops (zero padding 4) and horizontal flips. It never saw CIFAR-10's test split, Omniglot or
  PACS. The project's CIFAR-10 federation therefore uses only the test split's images.
- Recipe: AdamW (lr {args["lr"]}, weight decay {args["weight_decay"]}), batch {args["batch_size"]},
  {report["epochs"]} epochs with {args["warmup_epochs"]} warm-up epochs then cosine decay, label smoothing
  {args["label_smoothing"]}, seed {args["seed"]}.
- Compute: {report["train_seconds"] / 3600:.2f} h of training on `{report["device"]}`
  ({report["torch_threads"]} torch threads, a 2-core machine shared with other work while it ran).

## Accuracy
**CIFAR-10 test accuracy: {accuracy:.2%}** ({report["test_images"]:,} test images, measured once after the last
epoch; no checkpoint was selected on test data). Final-epoch training accuracy (augmented, label-smoothed
loss): {history[-1]["train_accuracy"]:.2%}.

{("## How this run went" + chr(10) + report["notes"] + chr(10)) if report.get("notes") else ""}
## Reproduce
```bash
python scripts/pretrain_vit.py --out hf_models/{model_dir.name} --epochs {report["epochs"]}
```
Checkpoints are written every epoch to `hf_models/checkpoints/` and the same command resumes. `pretraining_report.json`
beside the weights holds the per-epoch history this card was generated from.
"""
    return ModelCard(content)


def write_backbone_card(model_dir: Path) -> Path:
    card = backbone_card(model_dir)
    card.save(model_dir / "README.md")
    CARDS_DIR.mkdir(exist_ok=True)
    path = CARDS_DIR / f"{model_dir.name}.md"
    card.save(path)
    return path


if __name__ == "__main__":
    print(write_backbone_card(Path(sys.argv[1])))
