"""One spawn per world size, one test id per case (STYLE.md rule 17). Test-only code: the library never imports it.

Starting ranks costs seconds (fresh interpreters, a process group), so a multi-process module runs its worker once
per world size, and every case of that spawn reports as its own test, so that a failure names its case:

```py
from _spawn import Spawn, spawn_fixture, world_cases

MESHES = {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2)]}  # world size -> (ulysses, ring)
CASES = {world: [f"u{u}r{r}" for u, r in meshes] for world, meshes in MESHES.items()}


def _worker(rank, world_size, meshes):  # module level (picklable); runs on every rank
    return {f"u{u}r{r}": max_abs_diff(u, r) for u, r in meshes}  # case id -> this rank's numbers


spawned = spawn_fixture(  # a module-scoped fixture, named after the variable
    _worker, Spawn(2, args=(MESHES[2],), timeout=120.0), Spawn(4, args=(MESHES[4],), timeout=180.0)
)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases(CASES))  # ids: world2-u2r1, world2-u1r2, world4-u4r1, ...
def test_matches_single_process(spawned, world_size, case):
    for rank, diff in enumerate(spawned[world_size].case(case)):  # one value per rank
        assert diff <= 1e-5, f"rank {rank}: {diff}"
```

A world size spawns when its first test looks it up (so `-k world2` never starts 4 ranks); its per-rank results, or
the error that ended it, are kept until the end of the module. If the spawn failed (a rank raised or died, the
deadline passed, a test timeout interrupted it), every test that looks it up fails with that error, the failing rank's
traceback included; it is never retried, skipped or turned into a setup error. A rank that returns no entry for a
case fails that case's test, naming what the rank did return.

The first test of a world size pays for the spawn: its `timeout` mark (or `[tool:pytest] timeout`) must be above the
`Spawn`'s `timeout`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from diffusers_qwen_sp.distributed import DistributedProcessError, run_distributed


__all__ = ["Spawn", "SpawnResult", "SpawnedRuns", "spawn_fixture", "world_cases"]


@dataclass(frozen=True)
class Spawn:
    """One run of a worker: `run_distributed(fn, world_size, *args, timeout=..., collective_timeout=..., **kwargs)`."""

    world_size: int
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float = 120.0
    collective_timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Spawn: world_size must be a positive integer, got {self.world_size!r}.")
        if not isinstance(self.args, tuple):
            raise TypeError(f"Spawn: args must be a tuple, got {type(self.args).__name__}; write args=(value,).")
        if not self.timeout > 0:
            raise ValueError(f"Spawn: timeout must be positive, got {self.timeout!r}.")

    def __repr__(self) -> str:
        return f"Spawn(world_size={self.world_size}, timeout={self.timeout:g})"


class SpawnResult:
    """The return values of one spawn, in rank order, or the error that ended it. Spawns on first use, once."""

    def __init__(self, fn: Callable[..., Any], spawn: Spawn) -> None:
        self.fn = fn
        self.spawn = spawn
        self.spawn_count = 0  # 0 or 1: a failed spawn is not retried
        self.elapsed_s: float | None = None
        self._per_rank: list[Any] | None = None
        self._error: BaseException | None = None
        self._error_text = ""

    @property
    def label(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)} on {self.spawn.world_size} ranks"

    def __repr__(self) -> str:
        state = "not run" if not self.spawn_count else "failed" if self._error is not None else "ok"
        return f"SpawnResult({self.label}, {state})"

    def _run(self) -> None:
        self.spawn_count += 1
        start = time.monotonic()
        try:
            self._per_rank = run_distributed(
                self.fn,
                self.spawn.world_size,
                *self.spawn.args,
                timeout=self.spawn.timeout,
                collective_timeout=self.spawn.collective_timeout,
                **self.spawn.kwargs,
            )
        # `pytest.fail.Exception` is what pytest-timeout raises when the first test's timeout interrupts the spawn:
        # the later tests fail with it at once instead of each starting the spawn again.
        except (Exception, pytest.fail.Exception) as error:  # noqa: BLE001 - every dependent test reports it
            self._error = error
            if isinstance(error, DistributedProcessError):
                self._error_text = f"{type(error).__name__}: {error}"  # holds the rank's own traceback
            else:
                self._error_text = "".join(traceback.format_exception(error))
        finally:
            self.elapsed_s = time.monotonic() - start

    def per_rank(self, what: str = "this test") -> list[Any]:
        """Every rank's return value, in rank order. Fails the calling test if the spawn failed."""
        if not self.spawn_count:
            self._run()
        if self._error is not None:
            pytest.fail(
                f"{self.label} failed after {self.elapsed_s:.1f} s, so {what} has no result "
                f"(every test of this spawn fails with the same error):\n\n{self._error_text}",
                pytrace=False,
            )
        assert self._per_rank is not None
        return self._per_rank

    def case(self, case_id: Hashable) -> list[Any]:
        """Entry `case_id` of every rank's returned mapping, in rank order."""
        values = []
        for rank, returned in enumerate(self.per_rank(f"case {case_id!r}")):
            if not isinstance(returned, Mapping):
                pytest.fail(
                    f"rank {rank} of {self.label} returned a {type(returned).__name__}, not a mapping of case id to "
                    "result; make the worker return {case_id: result}.",
                    pytrace=False,
                )
            if case_id not in returned:
                pytest.fail(
                    f"rank {rank} of {self.label} returned no case {case_id!r}; it returned "
                    f"{sorted(map(repr, returned))}.",
                    pytrace=False,
                )
            values.append(returned[case_id])
        return values


class SpawnedRuns(Mapping[int, SpawnResult]):
    """World size -> [`SpawnResult`] of one worker: the value of a fixture made by [`spawn_fixture`]."""

    def __init__(self, fn: Callable[..., Any], spawns: Iterable[Spawn]) -> None:
        self.fn = fn
        self._runs: dict[int, SpawnResult] = {}
        for spawn in spawns:
            if not isinstance(spawn, Spawn):
                raise TypeError(f"expected Spawn(...) objects, got {spawn!r}.")
            if spawn.world_size in self._runs:
                raise ValueError(f"two Spawns for world size {spawn.world_size} of {fn.__name__}; give one each.")
            self._runs[spawn.world_size] = SpawnResult(fn, spawn)
        if not self._runs:
            raise ValueError(f"no Spawn given for {fn.__name__}; pass at least one, e.g. Spawn(2, timeout=120.0).")

    def __getitem__(self, world_size: int) -> SpawnResult:
        try:
            return self._runs[world_size]
        except KeyError:
            raise KeyError(
                f"{self.fn.__name__} has no Spawn for world size {world_size!r}; it has {sorted(self._runs)}."
            ) from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)

    def __repr__(self) -> str:
        return f"SpawnedRuns({list(self._runs.values())})"


def spawn_fixture(fn: Callable[..., Any], *spawns: Spawn) -> Any:
    """A module-scoped fixture whose value is a [`SpawnedRuns`] of `fn` (world size -> results, spawned lazily).

    Assign it to a module-level name: that name is the fixture's name. `fn(rank, world_size, *args, **kwargs)` must
    be a module-level function returning a mapping {case id: result} on every rank.
    """
    SpawnedRuns(fn, spawns)  # validate at import, where the mistake is

    @pytest.fixture(scope="module")
    def fixture() -> Iterator[SpawnedRuns]:
        yield SpawnedRuns(fn, spawns)  # fresh per module; the results are dropped when the module ends

    return fixture


def world_cases(cases: Mapping[int, Iterable[str]]) -> list[Any]:
    """Parameters `(world_size, case_id)` for `@pytest.mark.parametrize("world_size, case", ...)`, with the ids
    `world{world_size}-{case_id}`, in the given order."""
    params = []
    seen = set()
    for world_size, case_ids in cases.items():
        for case_id in case_ids:
            test_id = f"world{world_size}-{case_id}"
            if test_id in seen:
                raise ValueError(f"case {case_id!r} is listed twice for world size {world_size}.")
            seen.add(test_id)
            params.append(pytest.param(world_size, case_id, id=test_id))
    return params
