"""A shuffling DataLoader whose position survives a checkpoint, so a resumed run sees the same batches.

A shuffling ``DataLoader`` draws everything random from its ``generator``: each fresh iterator draws the
workers' base seed, then ``RandomSampler`` draws the pass's permutation (with persistent workers later passes
reuse the workers and draw only the permutation). A loader rebuilt after a restart starts that generator from
its seed again, so the first resumed epoch would repeat epoch 0's order. :class:`LoaderPosition` records the
generator states and the number of batches handed out; :class:`ResumableDataLoader` restores them:

- at an epoch boundary (the data module's ``state_dict``, restored before the loader is built): the next pass
  starts from the generator state the interrupted run would have continued from;
- mid-epoch (Lightning's stateful-loader protocol ``state_dict`` / ``load_state_dict``, which Lightning calls
  only when it restarts inside an epoch): the pass is redrawn from its starting state and the batches already
  trained on are skipped (by index without workers; loaded and dropped with workers).

With persistent workers the resumed loader must start new worker processes; their base seed is drawn from the
state the original workers were seeded from, so workers see the same seeds as in the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


class LoaderPosition:
    """Where a shuffling loader stands, shared by the loader and its data module (and by any copy Lightning
    makes of the loader, e.g. to insert a distributed sampler).

    Attributes:
        generator: the loader's generator (also the ``RandomSampler``'s).
        first_start: generator state before the base seed of the live workers was drawn.
        pass_start: generator state before the current pass drew from the generator.
        pass_fresh: whether the current pass drew a base seed (a new iterator) before its permutation.
        taken: batches handed out in the current pass.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.first_start: torch.Tensor | None = None
        self.pass_start: torch.Tensor | None = None
        self.pass_fresh = True
        self.taken = 0
        self.persistent = False
        self.pending: tuple[str, dict] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Generator states as uint8 tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "next": self.generator.get_state(),
            "first_start": self.first_start,
            "pass_start": self.pass_start,
            "pass_fresh": self.pass_fresh,
            "taken": self.taken,
            "persistent": self.persistent,
        }

    def resume_after(self, state: dict[str, Any]) -> None:
        """The next pass continues after the pass recorded in ``state`` (an epoch-boundary resume)."""
        self.pending = ("next", state)

    def resume_within(self, state: dict[str, Any]) -> None:
        """The next pass repeats the pass recorded in ``state`` and skips the batches it had handed out."""
        self.pending = ("within", state)


class ResumableDataLoader(DataLoader):
    """``DataLoader(shuffle=True, generator=...)`` that records and restores its position (see the module
    docstring); ``position`` is shared with the data module that saves it at epoch boundaries."""

    def __init__(self, *args, position: LoaderPosition | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.generator is None:
            raise ValueError("ResumableDataLoader needs a generator (its shuffling must be seeded)")
        self.position = position if position is not None else LoaderPosition(self.generator)
        if self.position.generator is not self.generator:
            raise ValueError("ResumableDataLoader: position tracks another generator than the loader's")

    def state_dict(self) -> dict[str, Any]:
        """Lightning saves this in mid-epoch checkpoints (its stateful-loader protocol)."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Lightning calls this when it restarts inside the epoch the state was saved in (unless its
        ``configure_optimizers`` built the loader before the loop state was loaded). A resume the data module
        already asked for wins: it knows whether the epoch had ended."""
        if self.position.pending is None:
            self.position.resume_within(state)

    def __iter__(self):
        position, generator = self.position, self.generator
        pending, position.pending = position.pending, None
        reused = self.persistent_workers and self.num_workers > 0 and self._iterator is not None
        skip, seed_from = 0, None
        if pending is not None:
            kind, state = pending
            if kind == "within" and state["pass_start"] is not None:
                generator.set_state(state["pass_start"])
                skip = int(state["taken"])
                workers_reused = not state["pass_fresh"]
            else:
                generator.set_state(state["next"])
                workers_reused = bool(state["persistent"]) and state["first_start"] is not None
            if workers_reused and not reused:  # new workers, seeded as the interrupted run's were
                seed_from = state["first_start"]
        position.persistent = self.persistent_workers and self.num_workers > 0
        position.pass_start = generator.get_state()
        position.pass_fresh = not reused and seed_from is None
        if position.pass_fresh:
            position.first_start = position.pass_start
        elif seed_from is not None:
            position.first_start = seed_from
        iterator = self._new_iterator(seed_from)
        for _ in range(skip):
            if self.num_workers == 0:
                next(iterator._sampler_iter)  # the indices of a batch already trained on, nothing loaded
            else:
                next(iterator)
        position.taken = skip
        return self._counting(iterator)

    def _new_iterator(self, seed_from: torch.Tensor | None):
        """The torch iterator; with ``seed_from`` its base seed is drawn from that state, not the generator."""
        if seed_from is None:
            return super().__iter__()
        scratch = torch.Generator()
        scratch.set_state(seed_from)
        original = self.generator
        self.generator = scratch  # only the base-seed draw reads loader.generator; the sampler keeps its own
        try:
            return super().__iter__()
        finally:
            self.generator = original

    def _counting(self, iterator):
        for batch in iterator:
            self.position.taken += 1
            yield batch
