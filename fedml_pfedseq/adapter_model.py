"""The client model: a frozen ``ViTForImageClassification`` with a PEFT LoRA adapter, plus a local head.

The backbone's own classifier is replaced by ``nn.Identity`` so that the ViT returns its [CLS] features; the new
classification head is a separate ``nn.Linear`` outside the PEFT model (not in ``modules_to_save``), so the
LoRA state a client sends never holds it. One ``AdapterModel`` can serve many clients: each client keeps its own
LoRA state and head state and loads them before it trains or evaluates.

Model-heterogeneous federations (pFedLoRA) give clients backbones of different depth: ``num_layers`` keeps the first
layers of the pretrained encoder, and ``lora_layers`` puts LoRA on the first layers only, so that backbones of every
depth carry an adapter of one shape (the same tensor names, and the same init for the same seed).
"""
from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoImageProcessor, ViTForImageClassification

from fedml_pfedseq.inputs import resolve_backbone
from fedml_pfedseq.lora_state import StateDict

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # device_args.mixed_precision -> autocast's type


def load_image_processor(name: str):
    return AutoImageProcessor.from_pretrained(resolve_backbone(name))


class AdapterModel(nn.Module):
    """Frozen ViT + LoRA adapter (trainable) + classification head (trainable, outside the adapter)."""

    precision = "fp32"  # device_args.mixed_precision; build_model sets it per recipe

    def __init__(
        self,
        backbone: str,
        num_labels: int,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
        num_layers: int | None = None,
        lora_layers: int | None = None,
    ):
        super().__init__()
        vit = ViTForImageClassification.from_pretrained(resolve_backbone(backbone))
        depth = vit.config.num_hidden_layers
        for name, value, most in (("num_layers", num_layers, depth), ("lora_layers", lora_layers, num_layers or depth)):
            if value is not None and not 1 <= value <= most:
                raise ValueError(f"{name}={value} must be in 1..{most}: backbone {backbone!r} has {depth} encoder "
                                 f"layers, and LoRA can only go on layers the model keeps")
        if num_layers is not None:
            del vit.vit.layers[num_layers:]  # the first num_layers pretrained layers, as the encoder runs them
            vit.config.num_hidden_layers = num_layers
        vit.classifier = nn.Identity()  # the ViT now returns [CLS] features; the head below classifies
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules),
                          layers_to_transform=list(range(lora_layers)) if lora_layers else None,
                          layers_pattern="layers" if lora_layers else None)
        with warnings.catch_warnings():  # PEFT 0.21 still calls a name transformers 5 deprecated: nothing to act on
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            self.backbone = get_peft_model(vit, lora)  # freezes everything but the LoRA matrices
        self.head = nn.Linear(vit.config.hidden_size, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits [batch, num_labels], always fp32 (the loss and every method's regulariser stay fp32); with
        ``precision`` "bf16" or "fp16" the ViT and the head compute under autocast in that type, so their backward
        does too."""
        with self.autocast():
            logits = self.head(self.backbone(pixel_values=pixel_values).logits)  # [CLS] features -> [batch, labels]
        return logits.float()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The [CLS] features the head reads [batch, hidden], fp32 (computed as ``forward`` computes them)."""
        with self.autocast():
            return self.backbone(pixel_values=pixel_values).logits.float()

    def autocast(self) -> torch.autocast:
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.head.weight.device.type, dtype=dtype, enabled=dtype is not None)

    def get_lora_state(self) -> StateDict:
        """A detached CPU copy of the LoRA tensors (PEFT's names, without the adapter name)."""
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.backbone).items()}

    def set_lora_state(self, state: StateDict) -> None:
        expected = get_peft_model_state_dict(self.backbone)
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise KeyError(f"LoRA state does not match the adapter: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"LoRA tensor {key}: shape {tuple(value.shape)} != {tuple(expected[key].shape)}")
        set_peft_model_state_dict(self.backbone, state)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.backbone.named_parameters() if ".lora_" in name]

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        """The backbone's own (non-LoRA) weights, frozen unless a method trains them (pFedLoRA's local model)."""
        return {name: p for name, p in self.backbone.named_parameters() if ".lora_" not in name}

    def get_backbone_state(self) -> StateDict:
        return {k: p.detach().cpu().clone() for k, p in self.backbone_parameters().items()}

    def set_backbone_state(self, state: StateDict) -> None:
        params = self.backbone_parameters()
        if state.keys() != params.keys():
            raise KeyError(f"backbone state does not match this model's {len(params)} backbone tensors "
                           f"(got {len(state)}): a client's local model must keep its depth")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(state[key])

    def get_head_state(self) -> StateDict:
        return {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}

    def set_head_state(self, state: StateDict) -> None:
        self.head.load_state_dict(state)

    def init_head_state(self, seed: int) -> StateDict:
        """A freshly initialised head, reproducible from ``seed`` (nn.Linear's default init)."""
        head = nn.Linear(self.head.in_features, self.head.out_features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head.reset_parameters()
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
