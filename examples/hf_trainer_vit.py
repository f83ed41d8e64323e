"""Sup-tickets in a Hugging Face Trainer script: a small ViTForImageClassification (built from a
config, nothing downloaded) on the CIFAR-10 mini split bundled with sparse_sup.

The script is an ordinary Trainer script; the Sup-tickets part is three lines: ``SparsityArguments``
in the argument parser, ``SupTicketsTrainer`` instead of ``Trainer``, and the summary at the end.

    python examples/hf_trainer_vit.py                                  # CPU, a few minutes
    python examples/hf_trainer_vit.py --sparse_density 0.05 --tickets_num_cycles 4 --num_train_epochs 8
    torchrun --nproc_per_node 2 examples/hf_trainer_vit.py --use_cpu   # DDP (gloo on CPU)

Every ``TrainingArguments`` and ``SparsityArguments`` field is a command-line option (``--help``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

from sparse_sup import SparsityArguments, SupTicketsTrainer  # noqa: E402
from sparse_sup.data import CIFAR10_MEAN, CIFAR10_STD, load_split_datasets  # noqa: E402


@dataclass
class ModelArguments:
    hidden_size: int = field(default=64, metadata={"help": "ViT width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT depth"})
    patch_size: int = field(default=4, metadata={"help": "patch size at 32x32 (4: 64 tokens)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N images"})


def transforms(train: bool):
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] + steps
    return v2.Compose(steps + [v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def with_pixels(dataset, train: bool):
    tf = transforms(train)

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
    parser.set_defaults(  # CPU-sized defaults; any of them can be overridden on the command line
        output_dir="runs/hf-trainer-vit",
        num_train_epochs=3,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        learning_rate=2e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the transform needs the "image" column
        sparse_density=0.2,
        sparse_update_interval=25,
        tickets_num_cycles=2,
        tickets_cycles_fraction=0.15,
        tickets_lr_low=1e-4,
        tickets_lr_high=5e-4,
    )
    args, sparsity, model_args = parser.parse_args_into_dataclasses()

    splits = load_split_datasets("bundled")
    train = splits.train
    if model_args.max_train_samples:
        train = train.select(range(model_args.max_train_samples))
    config = ViTConfig(
        image_size=32,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=2 * model_args.hidden_size,
        num_labels=splits.num_classes,
        id2label=dict(enumerate(splits.class_names)),
        label2id={n: i for i, n in enumerate(splits.class_names)},
    )
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)

    trainer = SupTicketsTrainer(
        model=model,
        args=args,
        sparsity_args=sparsity,
        train_dataset=with_pixels(train, train=True),
        eval_dataset=with_pixels(splits.eval, train=False),
        data_collator=collate,
    )
    trainer.train()
    metrics = trainer.evaluate()  # the final model: S_M
    trainer.save_model()  # S_M, loadable with ViTForImageClassification.from_pretrained(output_dir)
    if trainer.is_world_process_zero():
        print(trainer.sup_tickets_table())
        print(f"final model S_M: accuracy {100 * metrics['eval_accuracy']:.2f}%, saved in {args.output_dir}")


if __name__ == "__main__":
    main()
