"""Peak bytes of live tensors during a block of code, on CPU, on the meta device and on CUDA ([`LiveBytes`]), and the
flash-attention stand-in that lets the meta device trace attention as a GPU runs it ([`FlashAttentionOnMeta`]).

torch keeps no allocator statistics for the CPU, so [`LiveBytes`] counts tensors itself: a `TorchDispatchMode` sees
every tensor an aten op returns; a storage that is not one of the op's inputs (a view, an in-place op) is new and is
counted once, by its `StorageImpl`, until it dies (`weakref.finalize` on the storage, which torch keeps alive as long
as any tensor uses it). Storages resized in place (FSDP2 frees and re-allocates the unsharded parameters with
`untyped_storage().resize_()`, which no aten op sees) are followed through `UntypedStorage.resize_` while the block
runs. The same count runs on the meta device, where tensors have sizes but no data: tracing a model there gives its
eager peak at any size in a fraction of a second (the computed tables of `model_sizes` rely on it).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageResizeWatch:
    """While active, reports every `UntypedStorage.resize_` to the counters that watch (FSDP2's alloc/free)."""

    counters: list[LiveBytes] = []
    original: Any = None

    @classmethod
    def add(cls, counter: LiveBytes) -> None:
        if not cls.counters:
            cls.original = torch.UntypedStorage.resize_

            def resize_(storage: torch.UntypedStorage, size: int) -> Any:
                before = storage.nbytes()
                result = cls.original(storage, size)
                for watcher in list(cls.counters):
                    watcher._resized(storage, before, storage.nbytes())
                return result

            torch.UntypedStorage.resize_ = resize_
        cls.counters.append(counter)

    @classmethod
    def remove(cls, counter: LiveBytes) -> None:
        cls.counters.remove(counter)
        if not cls.counters:
            torch.UntypedStorage.resize_ = cls.original
            cls.original = None


class LiveBytes(TorchDispatchMode):
    r"""
    Peak bytes of the tensors allocated inside the `with` block and alive at the same time, above what was alive when
    it began (weights and inputs allocated before are not counted; a pre-existing storage resized inside counts the
    change).

    - **CPU and meta**: counted per storage as described in the module docstring. Scratch memory a kernel allocates
      and frees inside itself (no aten op returns it) is not seen.
    - **CUDA** (`device="cuda"`): `torch.cuda.max_memory_allocated` above `torch.cuda.memory_allocated` at entry, the
      caching allocator's own count; the dispatch-mode count runs too and is kept in `counted_peak_bytes`.

    Attributes (after the block): `peak_bytes`, `current_bytes` (still alive at exit), `counted_peak_bytes`, `method`.

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.memory import LiveBytes

    >>> with LiveBytes() as counter:
    ...     a = torch.empty(1000)  # 4000 bytes
    ...     b = torch.empty(2000)  # 8000: 12000 live
    ...     del a  # 8000
    >>> counter.peak_bytes, counter.current_bytes
    (12000, 8000)
    ```
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self._sizes: dict[int, int] = {}  # StorageImpl address -> bytes counted
        self.current_bytes = 0
        self.counted_peak_bytes = 0
        self.peak_bytes = 0
        self._cuda_start = 0
        self.method = (
            "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "live tensor storages (dispatch mode)"
        )

    # ------------------------------------------------------------------ accounting

    def _add(self, key: int, nbytes: int) -> None:
        self._sizes[key] = nbytes
        self.current_bytes += nbytes
        self.counted_peak_bytes = max(self.counted_peak_bytes, self.current_bytes)

    def _freed(self, key: int) -> None:
        self.current_bytes -= self._sizes.pop(key, 0)

    def _track(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        key = storage._cdata
        self._add(key, nbytes)
        weakref.finalize(storage, self._freed, key)

    def _resized(self, storage: torch.UntypedStorage, before: int, after: int) -> None:
        key = storage._cdata
        if key in self._sizes:
            self._sizes[key] += after - before
            self.current_bytes += after - before
        else:  # allocated before the block: count the change from now on, and its free
            self._track(storage, after)
            self.current_bytes -= before  # net change: after - before
        self.counted_peak_bytes = max(self.counted_peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = {leaf.untyped_storage()._cdata for leaf in tree_leaves((args, kwargs)) if _has_storage(leaf)}
        output = func(*args, **kwargs)
        for leaf in tree_leaves(output):
            if _has_storage(leaf):
                storage = leaf.untyped_storage()
                key = storage._cdata
                if key not in self._sizes and key not in inputs:  # new: not a view or an in-place result
                    self._track(storage, storage.nbytes())
        return output

    # ------------------------------------------------------------------ context

    def __enter__(self) -> LiveBytes:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        _StorageResizeWatch.add(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        _StorageResizeWatch.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._cuda_start
        else:
            self.peak_bytes = self.counted_peak_bytes

    def summary(self) -> dict[str, Any]:
        r"""`{"peak_bytes", "counted_peak_bytes", "method"}` for a report."""
        return {"peak_bytes": int(self.peak_bytes), "counted_peak_bytes": int(self.counted_peak_bytes),
                "method": self.method}

    def __repr__(self) -> str:
        return f"LiveBytes(device={self.device}, peak={self.peak_bytes}, current={self.current_bytes})"


def _has_storage(value: Any) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    try:
        value.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return False
    return True


class FlashAttentionOnMeta(TorchFunctionMode):
    r"""
    Inside the block, `F.scaled_dot_product_attention` on meta tensors allocates what a flash or memory-efficient
    kernel allocates: the output and a float32 log-sum-exp of `(B, H, S_q)`, never the `S_q x S_k` score matrix that
    the math fallback (the only one the meta device has) would materialise. Other devices run unchanged.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            if query.device.type == "meta":
                # (B, H, S_q, D_v) output; (B, H, S_q) float32 LSE, freed when the kernel returns
                output = query.new_empty(*query.shape[:-1], value.shape[-1])
                torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # the LSE, freed on return
                return output
        return func(*args, **kwargs)


__all__ = ["FlashAttentionOnMeta", "LiveBytes"]
