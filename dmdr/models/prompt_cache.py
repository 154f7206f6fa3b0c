"""The prompt-embedding cache of the text-to-image families (an LRU over (prompt, key) -> embeddings)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from tensordict import TensorDict


class PromptEmbeddingCache:
    """LRU cache of text embeddings, one entry per (prompt, extra) key.

    A batch is looked up prompt by prompt; only the missing prompts are encoded, in one call, and the rows are
    stacked back in order. Entries are stored on ``device`` (default: where they were computed; ``"cpu"`` keeps GPU
    memory free). ``max_entries=0`` disables caching.

    >>> cache = PromptEmbeddingCache(max_entries=2)
    >>> td = cache.lookup(["a", "b"], lambda ps: TensorDict({"e": torch.ones(len(ps), 3)}, batch_size=[len(ps)]))
    >>> td.batch_size, len(cache), cache.misses
    (torch.Size([2]), 2, 2)
    """

    def __init__(self, max_entries: int = 512, device: torch.device | str | None = None):
        self.max_entries = int(max_entries)
        self.device = device
        self._store: OrderedDict[Any, TensorDict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Any) -> bool:
        return key in self._store

    def clear(self) -> None:
        self._store.clear()

    def lookup(self, prompts: Sequence[str], encode: Callable[[list[str]], TensorDict], *, extra: Any = None,
               device: torch.device | str | None = None) -> TensorDict:
        """Embeddings of ``prompts`` as one TensorDict (batch len(prompts)), encoding the missing ones."""
        prompts = list(prompts)
        keys = [(p, extra) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        fresh: dict[Any, TensorDict] = {}
        if missing:
            td = encode([k[0] for k in missing])
            for i, k in enumerate(missing):
                row = td[i].clone()
                fresh[k] = row.to(self.device) if self.device is not None else row
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = []
        for k in keys:
            row = fresh.get(k)
            if row is None:
                row = self._store[k]
                self._store.move_to_end(k)
            rows.append(row)
        if self.max_entries > 0:
            for k, row in fresh.items():
                self._store[k] = row
                self._store.move_to_end(k)
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        out = torch.stack(rows, 0)
        return out.to(device) if device is not None else out



__all__ = ["PromptEmbeddingCache"]
