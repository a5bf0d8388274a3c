"""Registering a set of diffusers hooks all or nothing: the one way our features attach several hooks at once."""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn


def register_hooks(root: nn.Module, targets: list[tuple[nn.Module, ModelHook, str]]) -> None:
    r"""
    Register each `(module, hook, name)` of `targets` on its module's `HookRegistry`. If one registration raises
    (e.g. a name already taken), the ones before it are removed again, last first, and the error is raised: nothing
    stays half attached. The child-registry cache of `root` is invalidated either way, so `root`'s registry sees
    the change.
    """
    registered: list[tuple[HookRegistry, str]] = []
    try:
        for module, hook, name in targets:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(hook, name)
            registered.append((registry, name))
    except Exception:
        for registry, name in reversed(registered):
            registry.remove_hook(name, recurse=False)
        raise
    finally:
        HookRegistry.check_if_exists_or_initialize(root).invalidate_child_registries_cache()


__all__ = ["register_hooks"]
