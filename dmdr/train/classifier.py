"""Two small CNN classifiers on the 8×8 digits: the reward network and the (independent) evaluation network.

* :class:`DigitsClassifier` — the **reward** network behind the ``digits_classifier`` reward
  (:mod:`dmdr.rewards.digits`). Strided convolutions, SiLU (smooth, so ``∇_x log p(y|x)`` is informative).
* :class:`DigitsFeatureNet` — the fixed **evaluation** network used by :mod:`dmdr.eval.report` for FID,
  k-NN precision/recall (``features(x)``, the penultimate layer) and accuracy (``forward(x)``). A different
  architecture (conv-conv-pool-conv-pool-fc), width, activation (GELU) and seed, so that optimising the reward
  does not directly optimise the metric.

Both take images (B, 1, 8, 8) in **[0, 1]** and return logits (B, 10). They are trained with cross-entropy,
AdamW and a cosine learning-rate schedule, with random ±1-pixel shifts (zero fill) as augmentation, on the
``train`` split of :func:`dmdr.data.digits.load_digits_tensors` so that holdout accuracy is a real
generalisation number. The shipped weights come from ``bench/train_digits_classifiers.py`` (docs/evaluation.md).

>>> model, metrics = train_digits_classifier("reward", steps=10, batch_size=32, lr=1e-3, seed=0)
>>> sorted(metrics)
['holdout_accuracy', 'kind', 'seed', 'split', 'steps', 'train_accuracy', 'train_loss']
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.data.digits import DigitsBatches, load_digits_tensors, to_unit

Kind = Literal["reward", "features", "features_mlp"]
METADATA_KEY = "dmdr_classifier"


class DigitsClassifier(nn.Module):
    """Reward network: conv3×3(1→w) → conv3×3/2(w→2w) → conv3×3/2(2w→4w) → fc(16w→hidden) → fc(hidden→10), SiLU.

    Input (B, 1, 8, 8) in [0, 1]; output logits (B, 10). About 40k parameters at the defaults.
    """

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        self.config = {"width": int(width), "hidden": int(hidden)}
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)  # 8 -> 4
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)  # 4 -> 2
        self.fc1 = nn.Linear(16 * w, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.silu(self.conv1(x * 2 - 1))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return F.silu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


class DigitsFeatureNet(nn.Module):
    """Evaluation network: conv3×3(1→w) → conv3×3(w→w) → avgpool2 → conv3×3(w→2w) → avgpool2 → fc(8w→D) → fc(D→10), GELU.

    ``features(x)`` is the D-dimensional penultimate activation (D = ``feature_dim``, 128 by default) used for FID
    and precision/recall; ``forward(x)`` the logits used for accuracy. About 62k parameters at the defaults.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": int(width), "feature_dim": int(feature_dim)}
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: Tensor) -> Tensor:
        h = F.gelu(self.conv1(x * 2 - 1))
        h = F.avg_pool2d(F.gelu(self.conv2(h)), 2)  # 8 -> 4
        h = F.avg_pool2d(F.gelu(self.conv3(h)), 2)  # 4 -> 2
        return F.gelu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsMLPFeatureNet(nn.Module):
    """Second evaluation network, a different architecture on purpose: an MLP on the flattened 64 pixels,
    fc(64→h) → LayerNorm → ReLU → fc(h→h) → LayerNorm → ReLU → fc(h→D) → ReLU → fc(D→10).

    ``features(x)`` is the D-dimensional penultimate activation (D = ``feature_dim``, 64 by default) used for FID
    and precision/recall; ``forward(x)`` the logits. No convolution, no pooling: it sees no translation structure
    except what it learns, unlike :class:`DigitsFeatureNet`. About 48k parameters at the defaults.
    """

    def __init__(self, hidden: int = 160, feature_dim: int = 64):
        super().__init__()
        self.config = {"hidden": int(hidden), "feature_dim": int(feature_dim)}
        self.fc1, self.ln1 = nn.Linear(64, hidden), nn.LayerNorm(hidden)
        self.fc2, self.ln2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.ln1(self.fc1(x.flatten(1) * 2 - 1)))
        h = F.relu(self.ln2(self.fc2(h)))
        return F.relu(self.fc3(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


_ARCH: dict[str, type[nn.Module]] = {"reward": DigitsClassifier, "features": DigitsFeatureNet,
                                     "features_mlp": DigitsMLPFeatureNet}


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image (B, C, H, W) by an independent random integer offset in [-max_shift, max_shift]² (zero fill)."""
    B, C, H, W = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (B,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * s + 1, (B,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B,1,H,1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B,1,1,W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]


@torch.no_grad()
def accuracy(model: nn.Module, images01: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``argmax model(images01) == labels``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += (model(images01[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(labels), 1)


def train_digits_classifier(kind: Kind, *, steps: int, batch_size: int, lr: float, seed: int,
                            device: str | torch.device = "cpu", split: str = "train",
                            weight_decay: float = 1e-4, label_smoothing: float = 0.1, augment: bool = True,
                            progress: Callable[[int, dict], None] | None = None) -> tuple[nn.Module, dict]:
    """Train the ``kind`` network (``"reward"`` → :class:`DigitsClassifier`, ``"features"`` → :class:`DigitsFeatureNet`).

    Cross-entropy (with ``label_smoothing``), AdamW(lr, weight_decay), cosine decay of lr to 0 over ``steps`` (5% linear warm-up),
    uniform random batches from ``split`` (generator seeded by ``seed``), random ±1-pixel shifts if ``augment``.
    The initialisation uses ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the caller's global
    RNG state is untouched and the result is a function of the arguments (bit-exact on one thread, one torch).

    ``progress(step, {"loss": ...})`` is called every 100 steps and at the end, if given.

    Returns ``(model in eval mode, metrics)`` with metrics ``train_accuracy``, ``holdout_accuracy`` (unaugmented;
    holdout is only unseen when ``split == "train"``; for ``half_a``/``half_b`` also ``other_half_accuracy`` on the
    unseen half), ``train_loss`` (mean of the last 100 steps), ``kind``,
    ``seed``, ``steps``, ``split``.
    """
    if kind not in _ARCH:
        raise ValueError(f"unknown classifier kind {kind!r}; expected one of {', '.join(_ARCH)}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got steps={steps}, batch_size={batch_size}, lr={lr}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _ARCH[kind]().to(device)
    batches = DigitsBatches(batch_size, seed=seed + 1, split=split, device=device)
    aug_gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    recent: list[float] = []
    for step in range(steps):
        x, y = next(batches)
        x = to_unit(x)
        if augment:
            x = random_shift(x, aug_gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-100:]
        if progress is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            progress(step + 1, {"loss": sum(recent) / len(recent)})
    model.eval()
    xt, yt = load_digits_tensors(split)
    xh, yh = load_digits_tensors("holdout")
    metrics = {
        "kind": kind, "seed": int(seed), "steps": int(steps), "split": split,
        "train_loss": sum(recent) / len(recent),
        "train_accuracy": accuracy(model, to_unit(xt).to(device), yt.to(device)),
        "holdout_accuracy": accuracy(model, to_unit(xh).to(device), yh.to(device)),
    }
    if split in ("half_a", "half_b"):  # the complementary half was never seen: a real generalisation number
        xo, yo = load_digits_tensors("half_b" if split == "half_a" else "half_a")
        metrics["other_half_accuracy"] = accuracy(model, to_unit(xo).to(device), yo.to(device))
    return model, metrics


def save_classifier(model: nn.Module, path: str | Path, metrics: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) with metadata ``{"dmdr_classifier": json}``.

    The JSON holds ``kind`` (``"reward"`` / ``"features"``), ``config`` (the constructor arguments) and, if
    given, ``metrics``.
    """
    kind = next((k for k, cls in _ARCH.items() if type(model) is cls), None)
    if kind is None:
        raise ValueError(f"save_classifier expects a DigitsClassifier, DigitsFeatureNet or DigitsMLPFeatureNet, got {type(model).__name__}")
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": model.config, "metrics": metrics or {}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu", expect_kind: Kind | None = None) -> nn.Module:
    """Load a classifier written by :func:`save_classifier` (eval mode, on ``device``).

    Raises ``ValueError`` naming the file when it is missing, not safetensors, has no ``dmdr_classifier``
    metadata, declares an unknown kind (or not ``expect_kind``), or its tensors do not fit the declared config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"classifier file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(METADATA_KEY)
        state = load_file(str(path))
    except (SafetensorError, OSError, Exception) as e:  # safetensors raises several types on corrupt files
        raise ValueError(f"classifier file {path} is not a readable safetensors file ({e})") from e
    if meta_raw is None:
        raise ValueError(f"classifier file {path} has no {METADATA_KEY!r} metadata; write it with save_classifier")
    try:
        meta = json.loads(meta_raw)
        kind, config = meta["kind"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"classifier file {path} has malformed {METADATA_KEY!r} metadata: {e}") from e
    if kind not in _ARCH:
        raise ValueError(f"classifier file {path} declares unknown kind {kind!r}; expected one of {', '.join(_ARCH)}")
    if expect_kind is not None and kind != expect_kind:
        raise ValueError(f"classifier file {path} holds a {kind!r} network; expected a {expect_kind!r} network")
    try:
        model = _ARCH[kind](**config)
        model.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"classifier file {path} does not match its declared {kind!r} config {config}: {e}") from e
    return model.to(device).eval()
