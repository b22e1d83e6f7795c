"""State hygiene: snapshot what learner code could disturb before it runs; afterwards name what changed and
undo it, so that it never reaches the next test or the learner's next cell.

Watched (`_Guard`): the hooks on the model and the transcoders (TransformerLens temporary and permanent
hooks, raw torch hooks on any module), their parameters and buffers, which transcoders the dict holds, the
data of the cached world (graph, batches, cache, adjacency...), the call's own inputs (`_Values`: tensors
by value, lists, dicts and dataclass fields by identity) and global torch settings (`_torch_globals_kept`).

Restoring parameters: on a model whose parameters number at most `COPY_LIMIT` (the toy and planted worlds,
small test doubles) one pristine copy per world, taken when the world is first guarded, is copied back over
any changed tensor (which also catches edits through `.data`). A larger model is only watched through each
tensor's version counter and storage (a copy would double the memory); a change is reported with the advice
to reload the model, and the cached world is dropped so that the next test rebuilds it. Inputs and world
data are copied up to `ARG_COPY_LIMIT` elements per call; past it they too are watched, not restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..replacement import FreezeHooks
from .messages import _names
from .worlds import _forget_world, _World

# Worlds with at most this many parameters (model and transcoders) keep a pristine copy to restore from.
COPY_LIMIT = 50_000_000
# Elements of a call's inputs (and of the cached world's tensors) copied before each call, to restore them.
ARG_COPY_LIMIT = 20_000_000


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


def _same(a: Tensor, b: Tensor) -> bool:
    """Bit-identical values (NaN equal to NaN: a NaN that was there before is no change)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


class _Values:
    """The plain data learner code can reach from some roots and could edit in place: tensors (their
    values), lists, dicts and the fields of dataclasses (what each holds), by the path a learner would
    write. Modules are not walked (`_Guard` watches their parameters, buffers and hooks).

    Tensors are copied while the copies stay under `budget` elements, so that a change is undone; past it a
    tensor is watched through its version counter only, and a change cannot be undone."""

    def __init__(self, roots: dict[str, Any], budget: int):
        self.tensors: list[tuple[str, Tensor, Tensor | None, int, int]] = []
        self.containers: list[tuple[str, Any, Any]] = []
        self.budget = budget
        seen: set[int] = set()
        for path, x in roots.items():
            self._walk(x, path, 0, seen)

    def _walk(self, x: Any, path: str, depth: int, seen: set[int]) -> None:
        if depth > 8 or id(x) in seen or isinstance(x, (torch.nn.Module, type)):
            return
        if isinstance(x, Tensor):
            seen.add(id(x))
            copy = None
            if x.numel() <= self.budget:
                self.budget -= x.numel()
                copy = x.detach().clone()
            self.tensors.append((path, x, copy, _version(x), x.data_ptr()))
            return
        fields = None
        if isinstance(x, list):
            self.containers.append((path, x, list(x)))
            items = [(f"{path}[{i}]", v) for i, v in enumerate(x)]
        elif isinstance(x, dict):
            self.containers.append((path, x, dict(x)))
            items = [(f"{path}[{k!r}]", v) for k, v in x.items()]
        elif isinstance(x, tuple):
            names = getattr(x, "_fields", None) or [f"[{i}]" for i in range(len(x))]
            items = [(f"{path}.{n}" if not n.startswith("[") else f"{path}{n}", v) for n, v in zip(names, x)]
        elif (dataclasses.is_dataclass(x) or isinstance(x, SimpleNamespace)) and hasattr(x, "__dict__"):
            fields = dict(vars(x))
            self.containers.append((path, x, fields))
            items = [(f"{path}.{k}", v) for k, v in fields.items()]
        elif isinstance(x, FreezeHooks):
            items = [(f"{path}.frozen_values", x.frozen_values)]
        elif isinstance(getattr(x, "cache_dict", None), dict):  # an ActivationCache
            items = [(path, x.cache_dict)]
        else:
            return
        seen.add(id(x))
        for sub, v in items:
            if isinstance(v, (Tensor, list, dict, tuple)) or hasattr(v, "__dict__"):
                self._walk(v, sub, depth + 1, seen)

    def restore(self) -> tuple[list[str], bool]:
        """Put back what changed: (the paths that changed, whether every change was undone)."""
        changed, undone = [], True
        for path, x, saved in self.containers:
            if isinstance(x, list):
                if len(x) != len(saved) or any(a is not b for a, b in zip(x, saved)):
                    x[:] = saved
                    changed.append(path)
            elif isinstance(x, dict):
                if x.keys() != saved.keys() or any(x[k] is not v for k, v in saved.items()):
                    x.clear()
                    x.update(saved)
                    changed.append(path)
            else:
                now = vars(x)
                moved = [
                    k
                    for k in set(now) | set(saved)
                    if k not in now or k not in saved or now[k] is not saved[k]
                ]
                if moved:
                    for k in set(now) - set(saved):
                        object.__delattr__(x, k)
                    for k, v in saved.items():
                        object.__setattr__(x, k, v)
                    changed += [f"{path}.{k}" for k in sorted(moved)]
        for path, t, copy, version, ptr in self.tensors:
            if copy is None:
                if _version(t) != version or t.data_ptr() != ptr:
                    changed.append(path)
                    undone = False
            elif t.data_ptr() != ptr or not _same(t.detach(), copy):
                changed.append(path)
                try:
                    with torch.no_grad():
                        if t.shape == copy.shape and t.data_ptr() == ptr:
                            t.copy_(copy)
                        else:
                            t.data = copy
                except RuntimeError:  # e.g. an inference tensor outside inference mode
                    undone = False
        return changed, undone


def _pristine(model: Any, transcoders: dict, keep: dict) -> dict[tuple[int, str], Tensor] | None:
    """A copy of every parameter and buffer of a small model and its transcoders (taken once, kept in
    `keep`), to restore from; None if too big."""
    if "pristine" not in keep:
        slots = list(_tensor_slots(model, transcoders))
        if sum(t.numel() for *_, t in slots) > COPY_LIMIT:
            keep["pristine"] = None
        else:
            keep["pristine"] = {(id(d), key): t.detach().clone() for _, d, key, t in slots}
    return keep["pristine"]


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
    names what changed and undoes it.

    Watched: the hooks, parameters and buffers of `model` and `transcoders` and which transcoders the dict
    holds; the data of `world` (the cached `_World` they belong to, if any: its graph, batches, cache,
    adjacency...); and `inputs`, the arguments of the call by name. `keep` holds the pristine copy of a
    small model's weights (the world's `extra`, or a grader's own dict for a world it loads itself)."""

    def __init__(
        self,
        model: Any,
        transcoders: dict,
        keep: dict,
        *,
        world: _World | None = None,
        inputs: dict[str, Any] | None = None,
    ):
        self.model, self.transcoders, self.w = model, transcoders, world
        self.hooks = _hook_state(model, transcoders)
        self.slots = [
            (name, d, key, t, _version(t), t.data_ptr(), t.grad, t.requires_grad)
            for name, d, key, t in _tensor_slots(model, transcoders)
        ]
        self.layers = dict(transcoders)
        # The world's own fields: what the body adds to `extra` (lazy extras) is not learner code's doing.
        held = {} if world is None else {f.name: getattr(world, f.name) for f in dataclasses.fields(world)}
        held = {k: v for k, v in held.items() if k not in ("model", "transcoders", "extra")}
        self.world = _Values(held, ARG_COPY_LIMIT)
        self.inputs = _Values(inputs or {}, ARG_COPY_LIMIT)
        self.pristine = _pristine(model, transcoders, keep)
        if (
            self.pristine is not None
        ):  # a passed model may have changed between tests: that is not this call's doing
            for _, d, key, t, *_ in self.slots:
                kept = self.pristine.get((id(d), key))
                if kept is None or kept.shape != t.shape or not torch.equal(kept, t.detach()):
                    self.pristine[(id(d), key)] = t.detach().clone()

    def hook_sites(self) -> dict[str, int]:
        return _new_hook_sites(self.model, self.hooks, self.transcoders)

    def remove_hooks(self) -> None:
        _remove_new_hooks(self.model, self.hooks, self.transcoders)

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
        # Inputs first: a transcoders dict passed in and edited is named (and put back) as an input.
        inputs, inputs_undone = self.inputs.restore()
        world, world_undone = self.world.restore()
        changed, lost = [], False
        if self.transcoders.keys() != self.layers.keys() or any(
            self.transcoders[k] is not tc for k, tc in self.layers.items()
        ):
            self.transcoders.clear()
            self.transcoders.update(self.layers)
            changed.append("the transcoders dict (which layers it holds)")
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
            if lost and self.w is not None:
                _forget_world(self.w)
        touched = inputs + [path for path in world if path not in inputs]
        if touched:
            problems.append(
                f"{what} changed its input {_names(touched)} in place: work on a copy (e.g. x.clone() "
                "before editing it, x * s rather than x *= s, sorted(xs) rather than xs.sort()). "
                + (
                    "The autograder has restored it."
                    if inputs_undone and world_undone
                    else "The autograder will rebuild what it could not restore; rebuild your own copy too."
                )
            )
            if not world_undone and self.w is not None:
                _forget_world(self.w)
        return "\n".join(problems) if problems else None
