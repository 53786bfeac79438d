"""Choosing one candidate per prompt from its values: every method's rule, in one pure function.

``select(values [n, K, G], method, ...)`` needs no model: the engine calls it once per
block with the candidates' normalised values, and tests call it with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rmod_distill.weights import worst_case_weights

METHOD_KINDS = ("reference", "distilled", "cd", "best-of-n", "best-of-n-maxmin", "rmod")


@dataclass
class Method:
    """A decoding method resolved against the objectives: its kind and fixed weights."""

    name: str
    kind: str
    weights: np.ndarray | None = None  # cd's fixed weights over objectives

    @property
    def plain(self) -> bool:
        """Methods that sample one response and score nothing while decoding."""
        return self.kind in ("reference", "distilled")

    @property
    def blockwise(self) -> bool:
        """Methods that score candidates at every block (the others pick among whole responses)."""
        return self.kind in ("cd", "rmod")

    def shape(self, num_candidates: int, block_size: int, max_new_tokens: int) -> tuple[int, int]:
        """``(K, B)``: candidates per block and tokens per block for this method."""
        if self.plain:
            return 1, max_new_tokens
        if self.blockwise:
            return num_candidates, block_size
        return num_candidates, max_new_tokens


def parse_method(name: str, objectives: list[str], cd_weights: dict[str, float] | None = None) -> Method:
    """Resolve ``reference | distilled | cd | cd-<objective> | best-of-n | best-of-n-maxmin | rmod``.

    ``distilled`` samples plainly like ``reference``; the caller runs it with the adapter on.
    """
    if name in METHOD_KINDS and name != "cd":
        return Method(name, name)
    if name == "cd":
        if cd_weights is None:
            w = np.full(len(objectives), 1.0 / len(objectives))
        else:
            unknown = sorted(set(cd_weights) - set(objectives))
            if unknown:
                raise ValueError(f"decoding.cd_weights: unknown objective {unknown[0]!r}; objectives are {objectives}")
            w = np.array([cd_weights.get(o, 0.0) for o in objectives], dtype=np.float64)
            if w.sum() <= 0:
                raise ValueError("decoding.cd_weights must put positive weight on some objective")
            w = w / w.sum()
        return Method(name, "cd", w)
    if name.startswith("cd-"):
        objective = name[3:]
        if objective not in objectives:
            raise ValueError(f"method {name!r}: unknown objective {objective!r}; objectives are {objectives}")
        return Method(name, "cd", np.eye(len(objectives))[objectives.index(objective)])
    raise ValueError(
        f"unknown method {name!r}; expected one of reference, cd, cd-<objective>, best-of-n, "
        f"best-of-n-maxmin, rmod, distilled"
    )


def rank_missing(values: torch.Tensor) -> torch.Tensor:
    """Values ``[n, K, G]`` with every missing one (NaN: a judge that gave no score) replaced for ranking only.

    A candidate with no score on an objective ranks as the lowest-scored candidate of its
    prompt on that objective (it is not preferred for what nobody measured). Where no
    candidate of a prompt has a score on an objective, the objective becomes a constant at
    least as high as every value the prompt has: the same for every candidate, so fixed
    weights (cd) and the minimum over objectives (best-of-n-maxmin) ignore it, and it is never
    the worst case, so RMOD's weights leave it out instead of piling onto it (a constant 0 could
    be the lowest objective, take all the weight and tie every candidate). A prompt with no
    score at all is all zeros. The replacement never reaches a row: rows keep the missing score.
    """
    missing = torch.isnan(values)
    if not missing.any():
        return values
    inf = torch.full_like(values, float("inf"))
    lowest = torch.where(missing, inf, values).amin(1, keepdim=True)  # [n, 1, G]
    highest = torch.where(missing, -inf, values).amax((1, 2), keepdim=True)  # [n, 1, 1]
    highest = torch.where(torch.isinf(highest), torch.zeros_like(highest), highest)
    lowest = torch.where(torch.isinf(lowest), highest.expand_as(lowest), lowest)
    return torch.where(missing, lowest.expand_as(values), values)


def select(
    values: np.ndarray | torch.Tensor,
    method: Method,
    lam: float = 1.0,
    solver: str = "exact",
    selection: str = "argmax",
    generators: list[torch.Generator] | None = None,
) -> tuple[list[int], torch.Tensor | None]:
    """Pick a candidate per prompt from ``values [n, K, G]``; returns ``(chosen, weights [n, G] or None)``.

    - ``best-of-n``: the best mean value; ``best-of-n-maxmin``: the best minimum value;
    - ``cd``: ``argmax_k A @ w`` with the method's fixed weights;
    - ``rmod``: the worst-case weights ``w*`` of each prompt's block (``solver``), then
      ``argmax_k A @ w*`` or, with ``selection: sample``, a draw from
      ``softmax_k(lam * A @ w*)`` with each prompt's own generator.
    Plain methods (and K = 1) keep their only candidate. Missing values: :func:`rank_missing`.
    """
    values = rank_missing(torch.as_tensor(np.asarray(values), dtype=torch.float64))
    n, K, _ = values.shape
    if method.plain or K == 1:
        return [0] * n, None
    if method.kind == "best-of-n":
        return values.mean(-1).argmax(-1).tolist(), None
    if method.kind == "best-of-n-maxmin":
        return values.min(-1).values.argmax(-1).tolist(), None
    if method.kind == "rmod":
        w = worst_case_weights(values, lam, solver)
    else:
        w = torch.as_tensor(method.weights, dtype=torch.float64).expand(n, -1)
    scores = (values * w[:, None, :]).sum(-1)  # [n, K]
    if method.kind == "rmod" and selection == "sample":
        if generators is None or len(generators) != n:
            raise ValueError("selection: sample needs one generator per prompt")
        probs = torch.softmax(lam * scores, -1)
        return [int(torch.multinomial(probs[j].float(), 1, generator=g)) for j, g in enumerate(generators)], w
    return scores.argmax(-1).tolist(), w
