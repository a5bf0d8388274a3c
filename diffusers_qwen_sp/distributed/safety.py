"""Cross-rank safety: ranks that shard one computation agree on its inputs before it starts, and a failed collective
is told apart from a rank's own error, so that every rank can stop with a message that names the cause."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


class _Missing:
    """Stands for an entry one rank has and another lacks in [`check_same_across_ranks`]."""

    def __repr__(self) -> str:
        return "nothing"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Missing)

    def __hash__(self) -> int:
        return 0


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays whose `==` is elementwise
        return repr(a) == repr(b)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_across_ranks(
    values: dict[str, Any],
    group: dist.ProcessGroup | None = None,
    what: str = "call the pipeline with the same arguments",
) -> None:
    r"""
    Raise the same `ValueError` on every rank of `group` unless every rank passed equal `values`.

    Ranks that shard one computation must agree on what they compute: a rank given, say, a different step count runs
    a different sequence of collectives, which ends in a hang or a timeout long after the cause. One
    `all_gather_object` of `values` finds it before the work starts. Every rank of `group` must call it. A no-op
    without an initialised process group or with a group of one rank.

    Args:
        values (`dict[str, Any]`):
            Small, picklable descriptions of this rank's inputs, e.g. `{"num_inference_steps": 50, "height": 1024}`.
            Describe large objects by what must agree (a tensor by its shape, an image by its size).
        group (`ProcessGroup`, *optional*): the ranks that must agree; defaults to the world.
        what (`str`): the end of the error message, telling what every rank must do.

    Raises:
        `ValueError`: on every rank, naming each differing entry and the value of every rank, e.g.
            `num_inference_steps differs across ranks: rank 0 has 50, rank 1 has 30; every rank must call the
            pipeline with the same arguments.`

    Example:

    ```py
    >>> check_same_across_ranks({"num_inference_steps": steps, "prompt": prompt})
    ```
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, values, group=group)  # one dict per rank, in group-rank order
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(gathered)))
    keys = list(dict.fromkeys(key for entry in gathered for key in entry))
    differences = []
    for key in keys:
        per_rank = [entry.get(key, _Missing()) for entry in gathered]
        if all(_equal(value, per_rank[0]) for value in per_rank[1:]):
            continue
        distinct: list[tuple[Any, list[int]]] = []  # (value, ranks holding it) in order of first appearance
        for rank, value in zip(ranks, per_rank):
            for seen, holders in distinct:
                if _equal(value, seen):
                    holders.append(rank)
                    break
            else:
                distinct.append((value, [rank]))
        parts = [
            f"rank {holders[0]} has {_short_repr(value)}"
            if len(holders) == 1
            else f"ranks {', '.join(map(str, holders))} have {_short_repr(value)}"
            for value, holders in distinct
        ]
        differences.append(f"{key} differs across ranks: {', '.join(parts)}")
    if differences:
        raise ValueError("; ".join(differences) + f"; every rank must {what}.")


def is_collective_failure(error: BaseException) -> bool:
    r"""
    Whether `error` came out of a torch.distributed collective (a peer that died, closed its connection or did not
    arrive in time), as opposed to an error of this rank's own computation.

    `DistError` and its subclasses are; so is a `RuntimeError` raised inside the `torch.distributed` package, which is
    how gloo reports a closed connection (`Connection closed by peer`) or a timeout (`Timed out waiting ...`).
    """
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:  # the innermost Python frame: where the C++ error surfaced
        traceback = traceback.tb_next
    package = os.path.dirname(os.path.abspath(dist.__file__))
    return os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(package + os.sep)

