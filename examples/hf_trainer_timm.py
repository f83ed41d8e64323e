"""Sup-tickets on a timm model trained by a Hugging Face Trainer: the model is wrapped so that it
takes the Trainer's keyword inputs and returns a loss, nothing else changes. Data: the CIFAR-10 mini
split bundled with sparse_sup; the model is built from timm's registry (no weights downloaded).

    python examples/hf_trainer_timm.py                                 # resnet18 on CPU, a few minutes
    python examples/hf_trainer_timm.py --model_name resnet50 --sparse_method granet --num_train_epochs 20
    torchrun --nproc_per_node 2 examples/hf_trainer_timm.py --use_cpu  # DDP (gloo on CPU)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from sparse_sup import SparsityArguments, SupTicketsTrainer  # noqa: E402
from sparse_sup.data import CIFAR10_MEAN, CIFAR10_STD, load_split_datasets  # noqa: E402


@dataclass
class ModelArguments:
    model_name: str = field(default="resnet18", metadata={"help": "any timm model name"})
    label_smoothing: float = field(default=0.0)


class TimmForImageClassification(torch.nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with ``loss`` when labels are given."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {
            "loss": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing),
            "logits": logits,
        }


def with_pixels(dataset, train: bool):
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if train:
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] + steps
    tf = v2.Compose(steps)

    def apply(batch):
        return {"pixel_values": [tf(im.convert("RGB")) for im in batch["image"]], "labels": batch["label"]}

    return dataset.with_transform(apply)


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def main() -> None:
    parser = HfArgumentParser((TrainingArguments, SparsityArguments, ModelArguments))
    parser.set_defaults(  # the CIFAR recipe's optimizer (SGD 0.1, momentum 0.9), sized for a CPU
        output_dir="runs/hf-trainer-timm",
        num_train_epochs=3,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.1,
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the transform needs the "image" column
        sparse_density=0.1,
        sparse_update_interval=25,
        tickets_num_cycles=2,
        tickets_cycles_fraction=0.15,
        tickets_bn_recal_batches=20,
    )
    args, sparsity, model_args = parser.parse_args_into_dataclasses()

    splits = load_split_datasets("bundled")
    torch.manual_seed(args.seed)
    backbone = timm.create_model(model_args.model_name, num_classes=splits.num_classes)
    model = TimmForImageClassification(backbone, model_args.label_smoothing)

    trainer = SupTicketsTrainer(
        model=model,
        args=args,
        sparsity_args=sparsity,
        train_dataset=with_pixels(splits.train, train=True),
        eval_dataset=with_pixels(splits.eval, train=False),
        data_collator=collate,
    )
    trainer.train()
    metrics = trainer.evaluate()  # the final model: S_M
    trainer.save_model()  # S_M's state_dict (model.safetensors, keys prefixed "model.")
    if trainer.is_world_process_zero():
        print(trainer.sup_tickets_table())
        print(f"final model S_M: accuracy {100 * metrics['eval_accuracy']:.2f}%, saved in {args.output_dir}")


if __name__ == "__main__":
    main()
