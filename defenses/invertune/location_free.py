"""Universal perturbations for target identification that do not depend on where the trigger is.

The AdvCLIP corner patch (:class:`~defenses.invertune.target_identification.CornerPatchUAP`) finds a
backdoor whose trigger sits in the same corner; the 8/255 L-inf perturbation
(:class:`~defenses.invertune.target_identification.LinfUAP`) finds blend-like triggers. Neither covers the
other's case: on a real data set the corner patch picked a wrong class for Blended and the L-inf UAP a wrong
class for a BadNet patch at random positions. Two perturbations here remove the dependence on location:

- :class:`AnywherePatchUAP`: one universal patch pasted at a *random position of every image*, new
  positions at every optimisation step, so the patch must work wherever it lands (a trigger that fires at
  any position, or at one position the patch visits often enough, is what it converges to). Evaluation
  (``eval()``) draws the positions from the UAP's seed, so identification is deterministic.
- :class:`UnionUAP`: several perturbations fitted independently (by default the anywhere-patch and the
  L-inf one), and a class's ranking statistic (its rise in top-1 frequency, or its breadth) is its
  largest under any member (:func:`identify_union`); the member that produced the target's value is
  reported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from defenses.invertune.target_identification import (
    SquarePatchUAP,
    TargetIdentification,
    UniversalPerturbation,
    identify_target,
)


class AnywherePatchUAP(SquarePatchUAP):
    """A square patch (``area_fraction`` of the image) pasted by replacement at a uniformly random
    position of each image: ``x_adv = M_p * u + (1 - M_p) * x`` with a new top-left corner ``p`` per
    image and per call in training mode; in ``eval()`` the positions come from a generator re-seeded with
    ``seed`` at every call (row ``i`` of every batch gets the same position), so the rise is reproducible.
    The patch ``u`` (3 x s x s in [0, 1]) starts from U[0, 1] drawn with ``seed``. Its default Adam
    learning rate, 0.1, is ten times the corner patch's: each position sees a share of the steps (on
    both worlds' defender sets, 0.01 left the patch short of a BadNet trigger at random positions).
    """

    default_lr = 1e-1

    def __init__(
        self, image_size: int | tuple[int, int], *, area_fraction: float = 0.03, seed: int = 0
    ) -> None:
        super().__init__(image_size, area_fraction, seed)
        height, width = self.image_size
        if not 1 <= self.side <= min(height, width):
            raise ValueError(f"a {self.side} px patch does not fit a {height} x {width} image")
        self.seed = int(seed)
        self._train_generator = torch.Generator().manual_seed(seed + 1)

    def positions(self, count: int) -> Tensor:
        """``count x 2`` top-left corners (row, column) for the next call (see the class docstring)."""
        generator = self._train_generator if self.training else torch.Generator().manual_seed(self.seed)
        height, width = self.image_size
        rows = torch.randint(0, height - self.side + 1, (count,), generator=generator)
        cols = torch.randint(0, width - self.side + 1, (count,), generator=generator)
        return torch.stack([rows, cols], dim=1)

    def apply(self, images: Tensor) -> Tensor:
        self.check_images(images)
        out = images.clone()
        patch = self.patch.to(images)
        side = self.side
        for i, (top, left) in enumerate(self.positions(images.shape[0]).tolist()):
            out[i, :, top : top + side, left : left + side] = patch
        return out


class UnionUAP(UniversalPerturbation):
    """Several universal perturbations, fitted independently; the class ranking takes each class's
    largest rise under any member (:func:`identify_union`).

    ``members`` maps a name (``anywhere``, ``linf``, ...) to a :class:`UniversalPerturbation`. After
    :func:`identify_union`, ``selected`` names the member that produced the target's rise, and
    :meth:`apply` (what activation tuning uses with ``tune_with_uap``) applies that member; before, it is
    an error. The selection is saved with the state (``selected_index``), so a reloaded union applies the
    same member.
    """

    def __init__(self, members: dict[str, UniversalPerturbation]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a union needs at least 2 members, got {list(members)}")
        self.members = nn.ModuleDict(members)
        self.register_buffer("selected_index", torch.tensor(-1))

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def selected(self) -> str | None:
        index = int(self.selected_index)
        return None if index < 0 else self.names[index]

    def select(self, name: str) -> None:
        self.selected_index.fill_(self.names.index(name))

    def apply(self, images: Tensor) -> Tensor:
        if self.selected is None:
            raise RuntimeError("UnionUAP.apply before identify_union chose a member")
        return self.members[self.selected].apply(images)

    @torch.no_grad()
    def project_(self) -> None:
        for member in self.members.values():
            member.project_()

    def fit(self, model: nn.Module, images, class_text_embeds: Tensor, normalize, **kwargs) -> list[dict]:
        """Fit every member with the same settings (:meth:`UniversalPerturbation.fit`); the history
        records carry the member's name."""
        lr = kwargs.pop("lr", None)
        history: list[dict] = []
        for name, member in self.members.items():
            for record in member.fit(model, images, class_text_embeds, normalize, lr=lr, **kwargs):
                history.append({**record, "member": name})
        return history


def union_max(values: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
    """Each class's largest value over the members (``C``) and, per class, the member that gave it
    (ties: the first member in order)."""
    names = list(values)
    stacked = torch.stack([values[name].double() for name in names])
    best, which = stacked.max(dim=0)
    return best, [names[int(i)] for i in which]


@torch.no_grad()
def identify_union(
    model: nn.Module,
    images,
    class_text_embeds: Tensor,
    union: UnionUAP,
    normalize,
    batch_size: int = 256,
    score: str = "rise",
) -> TargetIdentification:
    """Rank the classes by their largest ``score`` statistic under any member of ``union`` (each member
    already fitted), e.g. ``increase(y) = max_k [P_k(y) - P_clean(y)]``; ``breadth`` likewise. The result's
    ``members`` holds every member's own statistic, ``source`` the member of the target's value (``union``
    then applies it), and ``p_adv`` / ``transitions`` are that member's."""
    results = {
        name: identify_target(model, images, class_text_embeds, member, normalize, batch_size, score)
        for name, member in union.members.items()
    }
    ranked_by, source = union_max({name: r.ranked_by for name, r in results.items()})
    increase, _ = union_max({name: r.increase for name, r in results.items()})
    breadth, _ = union_max({name: r.breadth for name, r in results.items()})
    ranking = torch.sort(ranked_by, descending=True, stable=True).indices.tolist()
    chosen = source[ranking[0]]
    union.select(chosen)
    first = results[chosen]
    return TargetIdentification(
        target=ranking[0],
        ranking=ranking,
        increase=increase,
        margin=float(ranked_by[ranking[0]] - ranked_by[ranking[1]]),
        p_clean=first.p_clean,
        p_adv=first.p_adv,
        num_images=first.num_images,
        transitions=first.transitions,
        breadth=breadth,
        score=score,
        members={name: r.ranked_by for name, r in results.items()},
        source=chosen,
    )
