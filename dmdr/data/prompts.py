"""Prompt data for text-to-image distillation: a prompts file and a resumable batch sampler.

DMDR is image-free: text-to-image runs train on prompts only (method.md §3.2, ``t2i-2m-filtered-prompts.txt``).

* :func:`load_prompts` reads a plain-text file (one prompt per line, every non-empty line kept: ``#`` is a legal
  prompt character, as in the official ``TextPromptDataset``) or
  a JSONL file (``{"prompt": ...}`` per line, selected by the ``.jsonl`` suffix). An empty, missing or malformed
  file raises a one-line :class:`ValueError` naming the file.
* :class:`PromptSampler` yields batches of prompts: a fresh random permutation per epoch, drawn from its own
  ``torch.Generator``, so ``state_dict()`` / ``load_state_dict()`` resume the exact next batch (STYLE.md §4).

>>> sampler = PromptSampler(["a cat", "a dog", "a fox"], batch_size=2, seed=0)
>>> len(sampler.next_batch()), sampler.negative(2)
(2, ['', ''])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def load_prompts(path: str | Path, *, key: str = "prompt") -> list[str]:
    """Read prompts from ``path`` (plain text, or JSONL when the suffix is ``.jsonl``/``.ndjson``).

    Plain text: one prompt per line, surrounding whitespace stripped, blank lines skipped; every other line is a
    prompt, also one starting with ``#`` (the official ``TextPromptDataset`` keeps ``line.strip()`` of every line;
    dmdr drops only the empty ones, which would train on the unconditional prompt). JSONL: one JSON object per non-blank line with a string field ``key``.

    Raises:
        ValueError: one line naming the file, when it cannot be read, is malformed or holds no prompts.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompt file {path}: {type(err).__name__}: {err}") from None
    prompts: list[str] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"prompt file {path}, line {lineno}: invalid JSON ({err.msg})") from None
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise ValueError(f"prompt file {path}, line {lineno}: expected an object with a string {key!r} field")
            if value.strip():
                prompts.append(value.strip())
    else:
        for line in text.splitlines():
            line = line.strip()
            if line:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (only blank lines)")
    return prompts


class PromptSampler:
    """Batches of prompts, a fresh permutation per epoch, resumable exactly.

    Each epoch draws ``randperm(len(prompts))`` from the sampler's own ``torch.Generator`` (seeded with ``seed``);
    batches are consecutive slices, wrapping into the next epoch, so every prompt is seen once per epoch.

    Args:
        prompts: the prompt list (e.g. from :func:`load_prompts`), or a path to a prompts file.
        batch_size: prompts per batch.
        seed: seed of the sampler's generator (independent of the global torch RNG).
        shuffle: ``False`` keeps file order (useful for evaluation).
        negative_prompt: the prompt used for the unconditional branch of CFG ("" = the empty prompt).
    """

    def __init__(self, prompts: Sequence[str] | str | Path, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 negative_prompt: str = ""):
        if isinstance(prompts, (str, Path)):
            prompts = load_prompts(prompts)
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts = list(prompts)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.negative_prompt = negative_prompt
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.cursor = 0
        self._epoch_start_state = self.generator.get_state()
        self._order = self._draw_order()

    def __len__(self) -> int:
        return len(self.prompts)

    def _draw_order(self) -> list[int]:
        n = len(self.prompts)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=self.generator).tolist()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self._epoch_start_state = self.generator.get_state()
        self._order = self._draw_order()

    def next_batch(self) -> list[str]:
        """The next ``batch_size`` prompts (wrapping into a new epoch when the current one runs out)."""
        batch: list[str] = []
        while len(batch) < self.batch_size:
            if self.cursor >= len(self._order):
                self._next_epoch()
            take = min(self.batch_size - len(batch), len(self._order) - self.cursor)
            batch.extend(self.prompts[i] for i in self._order[self.cursor:self.cursor + take])
            self.cursor += take
        return batch

    def __iter__(self) -> Iterator[list[str]]:
        while True:
            yield self.next_batch()

    def negative(self, batch: int | None = None) -> list[str]:
        """``batch`` copies of the negative prompt (the unconditional branch of CFG)."""
        return [self.negative_prompt] * (self.batch_size if batch is None else batch)

    def state_dict(self) -> dict:
        """Everything needed to resume: the generator state at the start of this epoch, the epoch and cursor."""
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "num_prompts": len(self.prompts),
                "shuffle": self.shuffle, "generator": self._epoch_start_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"PromptSampler state is for {state['num_prompts']} prompts, this sampler has "
                             f"{len(self.prompts)}; resume with the same prompts file")
        self.seed, self.epoch, self.cursor, self.shuffle = (int(state["seed"]), int(state["epoch"]),
                                                            int(state["cursor"]), bool(state["shuffle"]))
        self.generator.set_state(state["generator"].clone())
        self._epoch_start_state = self.generator.get_state()
        self._order = self._draw_order()
