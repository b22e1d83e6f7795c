"""State hygiene: snapshot what learner code could disturb (hooks, parameters, buffers, the cached world,
global torch settings) before it runs; afterwards name what changed and undo it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..replacement import FreezeHooks
from .messages import _names
from .worlds import _forget_world, _World

# Worlds with at most this many parameters (model and transcoders) keep a pristine copy to restore from.
COPY_LIMIT = 50_000_000


def _set_deterministic(state: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])


def _backend_flag(module: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(module, name)), (lambda value: setattr(module, name, value))


# Global torch state that learner code can change and that would outlive its test: (get, set) each.
_TORCH_GLOBALS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "default device": (torch.get_default_device, torch.set_default_device),
    "grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "anomaly detection": (
        lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        lambda state: torch.set_anomaly_enabled(*state),
    ),
    "deterministic algorithms": (
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        _set_deterministic,
    ),
    "float32 matmul precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "threads": (torch.get_num_threads, torch.set_num_threads),
    "cudnn.deterministic": _backend_flag(torch.backends.cudnn, "deterministic"),
    "cudnn.benchmark": _backend_flag(torch.backends.cudnn, "benchmark"),
    "cudnn.allow_tf32": _backend_flag(torch.backends.cudnn, "allow_tf32"),
    "cuda.matmul.allow_tf32": _backend_flag(torch.backends.cuda.matmul, "allow_tf32"),
    "CPU random state": (torch.get_rng_state, torch.set_rng_state),
}


@contextlib.contextmanager
def _torch_globals_kept() -> Iterator[None]:
    """Put every global torch setting in `_TORCH_GLOBALS` back as it was, whatever the block changed (a
    learner's `torch.set_default_dtype(torch.float64)` must not reach the next test or their next cell)."""
    saved = {name: get() for name, (get, _) in _TORCH_GLOBALS.items()}
    try:
        yield
    finally:
        for name, (get, put) in _TORCH_GLOBALS.items():
            now = get()
            same = torch.equal(now, saved[name]) if isinstance(now, Tensor) else now == saved[name]
            if not same:
                put(saved[name])


# --------------------------------------------------------------------------------------------------
# Hygiene: hooks, parameters and the cached world, snapshot before learner code and restored after
# --------------------------------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_KWARG_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _modules(model: Any, transcoders: dict | None = None) -> Iterator[tuple[str, Any]]:
    """(name, module) for the model's modules and, if given, every transcoder's, named as the learner
    would."""
    for name, m in model.named_modules():
        yield name or "model", m
    for layer, tc in (transcoders or {}).items():
        if isinstance(tc, torch.nn.Module):
            for name, m in tc.named_modules():
                yield f"transcoders[{layer}]" + (f".{name}" if name else ""), m


def _hook_state(model: Any, transcoders: dict | None = None) -> tuple[dict[int, tuple[set, ...]], set[int]]:
    """Which PyTorch hook ids each module holds, and which TransformerLens handles exist."""
    torch_level = {
        id(m): tuple(set(getattr(m, d, None) or {}) for d in _HOOK_DICTS)
        for _, m in _modules(model, transcoders)
    }
    lens_level = {id(h) for _, m in _modules(model, transcoders) for h in _lens_handles(m)}
    return torch_level, lens_level


def _lens_handles(module: Any) -> list:
    return list(getattr(module, "fwd_hooks", None) or []) + list(getattr(module, "bwd_hooks", None) or [])


def _new_hook_sites(model: Any, state: tuple, transcoders: dict | None = None) -> dict[str, int]:
    """{module name: number of hooks added since `state` and still there}."""
    torch_level, _ = state
    sites = {}
    for name, m in _modules(model, transcoders):
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        n = sum(len(set(getattr(m, d, None) or {}) - keep) for d, keep in zip(_HOOK_DICTS, before))
        if n:
            sites[name] = n
    return sites


def _new_hooks(model: Any, state: tuple, transcoders: dict | None = None) -> int:
    """How many hooks (of any kind, on any module) were added since `state` and are still there."""
    return sum(_new_hook_sites(model, state, transcoders).values())


def _new_lens_handles(model: Any, state: tuple) -> list:
    _, lens_level = state
    return [h for _, m in _modules(model) for h in _lens_handles(m) if id(h) not in lens_level]


def _remove_new_hooks(model: Any, state: tuple, transcoders: dict | None = None) -> None:
    """Remove every hook added since `state`, whoever added it and however."""
    torch_level, lens_level = state
    for _, m in _modules(model, transcoders):
        for attr in ("fwd_hooks", "bwd_hooks"):
            handles = getattr(m, attr, None)
            if not isinstance(handles, list):
                continue
            for h in handles:
                if id(h) not in lens_level:
                    h.hook.remove()
            setattr(m, attr, [h for h in handles if id(h) in lens_level])
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        for d, keep in zip(_HOOK_DICTS, before):
            hooks = getattr(m, d, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in keep]:
                hooks.pop(key)
                for extra in _HOOK_KWARG_DICTS:
                    getattr(m, extra, {}).pop(key, None)


def _describe_hooks(sites: dict[str, int]) -> str:
    shown = ", ".join(f"{n} on {name}" for name, n in list(sites.items())[:4])
    return shown + (f" and {len(sites) - 4} more modules" if len(sites) > 4 else "")


def _tensor_slots(model: Any, transcoders: dict) -> Iterator[tuple[str, dict, str, Tensor]]:
    """(display name, owning dict, key, tensor) for every parameter and buffer of the model and
    transcoders."""
    for name, m in _modules(model, transcoders):
        prefix = "model." if name == "model" or not name.startswith("transcoders[") else ""
        base = "model" if name == "model" else f"{prefix}{name}"
        for store in ("_parameters", "_buffers"):
            d = getattr(m, store, None) or {}
            for key, t in d.items():
                if isinstance(t, Tensor):
                    yield f"{base}.{key}", d, key, t


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _world_tensors(w: _World) -> dict[str, Tensor]:
    """Every tensor the cached world holds (its model and transcoders aside), by a readable path."""
    found: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(x: Any, path: str, depth: int) -> None:
        if depth > 6 or id(x) in seen:
            return
        if isinstance(x, Tensor):
            found.setdefault(path, x)
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "pristine":
                    walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                if isinstance(v, (Tensor, list, tuple, dict)):
                    walk(v, f"{path}[{i}]", depth + 1)
        elif hasattr(x, "cache_dict"):  # ActivationCache
            walk(x.cache_dict, path, depth + 1)
        elif dataclasses.is_dataclass(x) or isinstance(x, FreezeHooks):
            for k, v in vars(x).items():
                if k not in ("model", "transcoders", "nodes"):
                    walk(v, f"{path}.{k}", depth + 1)

    for f in dataclasses.fields(w):
        if f.name not in ("model", "transcoders"):
            walk(getattr(w, f.name), f.name, 0)
    return found


def _pristine(w: _World) -> dict[tuple[int, str], Tensor] | None:
    """A copy of every parameter and buffer of a small world (taken once), to restore from; None if too
    big."""
    if "pristine" not in w.extra:
        slots = list(_tensor_slots(w.model, w.transcoders))
        if sum(t.numel() for *_, t in slots) > COPY_LIMIT:
            w.extra["pristine"] = None
        else:
            w.extra["pristine"] = {(id(d), key): t.detach().clone() for _, d, key, t in slots}
    return w.extra["pristine"]


def _guess(name: str, t: Tensor) -> str:
    """What the learner probably did to a parameter, to put in the message."""
    if t.dim() == 2 and t.is_floating_point() and t.numel() > 1:
        for dim in (-1, 0):
            mean = t.detach().double().mean(dim=dim)
            if mean.abs().max() <= 1e-6 * max(t.detach().abs().max().item(), 1e-12):
                return " (demeaning it?)"
    return ""


class _Guard:
    """A snapshot of everything learner code could disturb, taken before it runs; `check()` afterwards
    names what changed and undoes it."""

    def __init__(self, w: _World):
        self.w = w
        self.hooks = _hook_state(w.model, w.transcoders)
        self.slots = [
            (name, d, key, t, _version(t), t.data_ptr(), t.grad, t.requires_grad)
            for name, d, key, t in _tensor_slots(w.model, w.transcoders)
        ]
        self.world = {path: (t, _version(t)) for path, t in _world_tensors(w).items()}
        self.pristine = _pristine(w)
        if (
            self.pristine is not None
        ):  # a passed model may have changed between tests: that is not this call's doing
            for _, d, key, t, *_ in self.slots:
                kept = self.pristine.get((id(d), key))
                if kept is None or kept.shape != t.shape or not torch.equal(kept, t.detach()):
                    self.pristine[(id(d), key)] = t.detach().clone()

    def hook_sites(self) -> dict[str, int]:
        return _new_hook_sites(self.w.model, self.hooks, self.w.transcoders)

    def remove_hooks(self) -> None:
        _remove_new_hooks(self.w.model, self.hooks, self.w.transcoders)

    def check(self, what: str, *, hooks_allowed: bool = False, hook_hint: str = "") -> str | None:
        """Undo every side effect since the snapshot; describe the ones learner code should not have had."""
        problems = []
        sites = {} if hooks_allowed else self.hook_sites()
        if sites:
            self.remove_hooks()
            n = sum(sites.values())
            problems.append(
                f"{what} left {n} hook{'s' if n != 1 else ''} on the model ({_describe_hooks(sites)}): "
                + (
                    hook_hint
                    or "remove every hook your code adds before it returns (add them with "
                    "`with model.hooks(fwd_hooks=...):`, or keep the handles and remove "
                    "them in a `finally:` block)"
                )
                + "."
            )
        changed, lost = [], False
        for name, d, key, t, version, ptr, grad, requires_grad in self.slots:
            now = d.get(key)
            if now is not t:  # rebound to another tensor: put the original back
                d[key] = t
                changed.append(name)
            pristine = None if self.pristine is None else self.pristine.get((id(d), key))
            modified = _version(t) != version or t.data_ptr() != ptr
            if pristine is not None and not modified:
                modified = t.shape != pristine.shape or not torch.equal(t.detach(), pristine)
            if modified:
                if name not in changed:
                    changed.append(name + _guess(name, t))
                if pristine is None:
                    lost = True
                else:
                    with torch.no_grad():
                        if t.shape == pristine.shape and t.data_ptr() == ptr:
                            t.copy_(pristine)
                        else:
                            t.data = pristine.clone()
            with contextlib.suppress(RuntimeError):  # quietly: gradients and flags don't change any answer
                t.grad = grad
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
        if changed:
            undone = (
                "We could not undo this on a model this large: reload the model before going on."
                if lost
                else "The autograder has restored it."
            )
            problems.append(
                f"{what} changed {_names(changed)} in place: work on copies (x - m, not x -= m; "
                f"no .data edits; do not reassign model weights). {undone}"
            )
            if lost:
                _forget_world(self.w)
        touched = [path for path, (t, version) in self.world.items() if _version(t) != version]
        if touched:
            problems.append(
                f"{what} changed its input {_names(touched)} in place: work on a copy (e.g. x.clone() "
                "before editing it, or x * s rather than x *= s). The autograder will rebuild it."
            )
            _forget_world(self.w)
        return "\n".join(problems) if problems else None
