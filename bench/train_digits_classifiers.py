"""Reproduce the shipped digits classifiers ``dmdr/assets/digits_{classifier,features}.safetensors``.

Both are trained on the ``train`` split (1442 images) of scikit-learn's digits with
:func:`dmdr.train.classifier.train_digits_classifier` on CPU, one thread:

* reward network (``kind="reward"``):   seed 0, 3000 steps, batch 128, lr 3e-3, label smoothing 0.1
* feature network (``kind="features"``): seed 1, 3000 steps, batch 128, lr 3e-3, label smoothing 0.1

(AdamW, weight decay 1e-4, cosine schedule with 5% warm-up, random ±1-pixel shifts.) Run::

    OMP_NUM_THREADS=1 python bench/train_digits_classifiers.py [--out dmdr/assets]

It takes about 10 s + 30 s on one CPU core and prints the train/holdout accuracies. With the same torch version
and one thread the written weights are bit-identical to the shipped ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmdr.train.classifier import save_classifier, train_digits_classifier

RECIPES = {
    "digits_classifier.safetensors": dict(kind="reward", seed=0, steps=3000, batch_size=128, lr=3e-3,
                                          label_smoothing=0.1),
    "digits_features.safetensors": dict(kind="features", seed=1, steps=3000, batch_size=128, lr=3e-3,
                                        label_smoothing=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "dmdr" / "assets")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, recipe in RECIPES.items():
        recipe = dict(recipe)
        kind = recipe.pop("kind")
        model, metrics = train_digits_classifier(kind, **recipe)
        metrics["recipe"] = {"kind": kind, **recipe}
        path = save_classifier(model, args.out / name, metrics=metrics)
        print(f"{path}: {json.dumps({k: metrics[k] for k in ('train_accuracy', 'holdout_accuracy')})}")


if __name__ == "__main__":
    main()
