"""Kernel launches with less host time: `launcher(kernel)[grid](*args, **kwargs)`.

Triton's own launch path (`kernel[grid](...)`) re-derives, on every call, what it already knows after
the first: the autotuner rebuilds its key and argument dicts, the JIT binds and specializes every
argument, looks the compiled kernel up and checks its globals. With 30-40 arguments that is ~50-100 us
of host time per launch on the lent GPU machines' CPUs, as long as a small attention kernel runs, and
it is paid by every eager call (benchmarks/overhead.py measures it).

`launcher(kernel)` remembers, per *launch key*, the compiled kernel and the autotuner's config that
the normal path produced, and launches it straight through its compiled launcher. The launch key
is at least as specific as Triton's own cache key, so a hit is always the kernel Triton would run:
- per tensor argument its dtype and whether its address is 16-byte aligned;
- per int argument whether it is 1, whether it is a multiple of 16, and whether it fits int32 (else
  its value); floats and bools by type; None;
- per host tensor descriptor (TMA) its base's dtype, its block shape and padding (what Triton compiles
  it as; its base address, shape and strides are launch arguments);
- constexpr arguments, the autotuner's key arguments and all keyword arguments by value (numbers
  tagged with their type), so an equal launch key means an equal autotuner key. On a hit the
  autotuner must still hold the config list the remembered config came from and, for a tuned
  kernel, still cache that very config (a replaced config list, a cleared or a re-tuned autotuner
  sends the call back through the normal path);
- the device.
A config's pre_hook (e.g. one that sets the descriptors' block shapes from the config's tiles) runs
before every launch of that config, with the arguments the autotuner would give it. Anything unusual
(an argument of another type, launch hooks installed by a profiler, the interpreter) takes the normal
path. On by default; FATTN_FAST_LAUNCH=0 turns it off
(every package's GPU suite passes with it on, NVIDIA H200, 2026-11-22).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from fattn.core.runtime import env_flag, interpreter_enabled

__all__ = ["FastLauncher", "checking_plans", "clear_launch_caches", "fast_launch_enabled", "launcher"]

# FATTN_FAST_LAUNCH=0: every launch takes Triton's own path (e.g. to rule the shortcut out of a bug hunt).
_ENABLED = env_flag("FATTN_FAST_LAUNCH", True)
# FATTN_CHECK_PLANS=1 (the test plugin sets it): every launch_planned call also builds its arguments and
# checks them against those an earlier call with the same signature built, i.e. that the caller's
# signature fixes everything but the tensors. Also under the interpreter, where no plan is ever used.
_CHECK_PLANS = env_flag("FATTN_CHECK_PLANS", False)
_LAUNCHERS: dict[int, FastLauncher] = {}
_UNCACHEABLE = object()
_INT32 = 2**31
# Launch keys remembered per kernel; past this many (e.g. a shape changing every call) start over.
_MAX_ENTRIES = 4096


def fast_launch_enabled(enabled: bool | None = None) -> bool:
    """Whether launches take the remembered-kernel shortcut; with an argument, set it (returns the
    previous setting)."""
    global _ENABLED
    previous = _ENABLED
    if enabled is not None:
        _ENABLED = bool(enabled)
    return previous


@contextlib.contextmanager
def checking_plans(enabled: bool = True) -> Iterator[None]:
    """FATTN_CHECK_PLANS's check of planned launches on (or off) inside a `with` block: benchmarks,
    which the test plugin's settings also reach, turn it off (it builds every call's arguments)."""
    global _CHECK_PLANS
    previous = _CHECK_PLANS
    _CHECK_PLANS = bool(enabled)
    try:
        yield
    finally:
        _CHECK_PLANS = previous


def launcher(kernel: Any) -> FastLauncher:
    """The FastLauncher of a @triton.jit or @triton.autotune kernel (one per kernel object)."""
    fast = _LAUNCHERS.get(id(kernel))
    if fast is None or fast.kernel is not kernel:
        fast = _LAUNCHERS[id(kernel)] = FastLauncher(kernel)
    return fast


def clear_launch_caches() -> None:
    """Forget every remembered kernel (the next launches take Triton's normal path once)."""
    for fast in _LAUNCHERS.values():
        fast.cache.clear()
        fast.plans.clear()
        fast.built.clear()


def _hooks_installed() -> bool:
    """Whether a launch enter/exit hook is installed (a profiler such as proton): then every launch
    takes Triton's own path, which gives the hooks their metadata. Triton 3.6 keeps the hooks as
    HookChains (empty when nothing is installed); older versions as None or a callable."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _Entry:
    __slots__ = ("compiled", "config", "configs", "constexprs", "pre_hook", "tune_key")

    def __init__(self, compiled: Any, config: Any, configs: list | None, tune_key: tuple | None,
                 constexprs: dict[str, Any]) -> None:
        self.compiled = compiled
        self.config = config
        self.configs = configs  # the autotuner's config list it was picked from (None: not autotuned)
        self.tune_key = tune_key
        self.constexprs = constexprs
        # the config's pre_hook, run before each launch (as the autotuner runs it), or None
        self.pre_hook = config.pre_hook if config is not None else None


class _Plan:
    """A launch with everything but its tensor arguments fixed (see FastLauncher.launch_planned)."""

    __slots__ = ("entry", "grid", "slots", "tensor_meta", "values")

    def __init__(self, entry: _Entry, grid: tuple[int, int, int], values: list[Any], slots: tuple[int, ...],
                 tensor_meta: tuple[tuple[Any, ...], ...]) -> None:
        self.entry = entry
        self.grid = grid
        self.values = values  # every parameter's value, the tensors' slots included (replaced per call)
        self.slots = slots  # indices into values of the call's tensors (and tensor descriptors)
        self.tensor_meta = tensor_meta


def _padding(t: TensorDescriptor) -> str:
    """A descriptor's padding mode (Triton 3.4's descriptors have none: their loads pad with zeros)."""
    return getattr(t, "padding", "zero")


def _slot_meta(t: torch.Tensor | TensorDescriptor) -> tuple[Any, ...]:
    """What a plan requires of the tensor (dtype, 16-byte alignment, device) or tensor descriptor
    (its base's dtype and device, its block shape and padding: what Triton compiled it as) in a slot."""
    if type(t) is TensorDescriptor:
        return (TensorDescriptor, t.base.dtype, t.base.get_device(), tuple(t.block_shape), _padding(t))
    return (t.dtype, t.data_ptr() % 16 == 0, t.get_device())


def _fixed_part(a: Any) -> Any:
    """An argument as FATTN_CHECK_PLANS compares it across calls of one signature: a tensor by position
    only, a tensor descriptor by everything but its base's address, anything else by value."""
    if isinstance(a, torch.Tensor):
        return torch.Tensor
    if type(a) is TensorDescriptor:
        return (TensorDescriptor, a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), _padding(a))
    return a


def _tensor_pointers(plan: _Plan, tensors: tuple[torch.Tensor | TensorDescriptor, ...]) -> list[Any] | None:
    """The plan's argument values with this call's tensors in place, as device addresses; None when a
    tensor's dtype, 16-byte alignment or device differs from the plan's (the call then takes `run`).

    Addresses, not tensors: Triton's launcher asks the driver to confirm every tensor argument's
    address (cuPointerGetAttribute, 1-3 us each on the lent machines' hosts) and calls its data_ptr();
    an int argument skips both. That check exists to catch a CPU tensor, which the device index
    compared here (-1 for a CPU tensor) catches first. Tensor descriptors go in as themselves (Triton's
    launcher encodes each into a TMA descriptor)."""
    meta = plan.tensor_meta
    if len(tensors) != len(meta):
        return None
    values = plan.values.copy()
    for slot, t, m in zip(plan.slots, tensors, meta):
        if type(t) is TensorDescriptor:
            if _slot_meta(t) != m:
                return None
            values[slot] = t
            continue
        address = t.data_ptr()
        if t.dtype is not m[0] or (address % 16 == 0) is not m[1] or t.get_device() != m[2]:
            return None
        values[slot] = address
    return values


class FastLauncher:
    """Launches `kernel` (JITFunction or Autotuner over one) by its remembered compiled kernel."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        # The @triton.jit function (under the interpreter an InterpretedFunction: arg_names, no params).
        self.jit = jit = kernel.fn if self.autotuner is not None else kernel
        self.usable = (not interpreter_enabled()) and hasattr(jit, "params") and hasattr(jit, "signature")
        self.cache: dict[tuple, _Entry | object] = {}
        self.plans: dict[tuple, _Plan | object] = {}
        self.built: dict[tuple, tuple] = {}  # signature -> what build() gave (FATTN_CHECK_PLANS only)
        self.hits = 0  # launches that took the shortcut (benchmarks/overhead.py reports them)
        if not self.usable:
            return
        self.names = [p.name for p in jit.params]
        self.constexpr = [p.is_constexpr for p in jit.params]
        self.defaults = {name: p.default for name, p in jit.signature.parameters.items()
                         if p.default is not p.empty}
        self.tune_names = list(self.autotuner.keys) if self.autotuner is not None else []
        # Positional parameters keyed by value (constexprs, the autotuner's key) or, for ints, floats
        # and bools, by what Triton specializes them on (a growing KV-cache length keeps its key).
        by_value = set(self.tune_names) if self.autotuner is not None and len(self.autotuner.configs) > 1 else set()
        self.int_by_class = tuple(not (p.is_constexpr or p.name in by_value) for p in jit.params)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    # The key ------------------------------------------------------------------------------------
    def _key(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple | None:
        """The launch key (module docstring), or None for an argument it does not model. Hot path
        (host time per launch is what this module is for): one exact type check per int."""
        parts: list[Any] = []
        append = parts.append
        tensor = torch.Tensor
        for value, by_class in zip(args, self.int_by_class):
            tp = type(value)
            if tp is int:
                if by_class:  # Triton's specialization: == 1, % 16 == 0, int32 or wider (by value)
                    append(-1 if value == 1 else (-16 if value % 16 == 0 else 0) if -_INT32 <= value < _INT32
                           else value)
                else:
                    append(value)
            elif value is None:
                append(None)
            elif tp is tensor or isinstance(value, tensor):
                append((value.dtype, value.data_ptr() % 16 == 0))
            elif tp is float or tp is bool:
                # by type, or tagged value: 1 == 1.0 == True, but Triton compiles each differently
                append(tp if by_class else (tp, value))
            elif tp is TensorDescriptor:
                append(_slot_meta(value))
            elif not by_class:
                append(value)
            else:
                return None  # e.g. a numpy int: not modelled here
        if kwargs:
            append(tuple(kwargs))
            for value in kwargs.values():
                tp = type(value)
                if tp is tensor or isinstance(value, tensor):
                    append((value.dtype, value.data_ptr() % 16 == 0))
                elif tp is TensorDescriptor:
                    append(_slot_meta(value))
                else:
                    append((tp, value))
        return tuple(parts)

    def _tune_key(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple | None:
        """The autotuner's own cache key for this call (as Autotuner.run builds it)."""
        if self.autotuner is None or len(self.autotuner.configs) <= 1:
            return None
        named = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name in self.names:
                named[name] = value
        key = [named[k] for k in self.tune_names if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)

    # Planned launches --------------------------------------------------------------------------
    def launch_planned(self, signature: tuple | None, tensors: tuple[torch.Tensor | TensorDescriptor, ...],
                       build: Callable[[], tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> Any:
        """Launch with `build()`'s (grid, args, kwargs), building them once per `signature`.

        For ops whose arguments are all derived from a few tensors' metadata: the caller promises that
        `signature` (hashable; e.g. fattn.core.checks.call_signature of the inputs) fixes the grid, every
        non-tensor argument and every keyword argument, and passes the call's tensors (and host tensor
        descriptors, made before `build` and used by it) in the order they appear in the kernel's
        parameters (a None signature: no plan, `run`). A hit skips the launch key and argument binding;
        the tensors' dtypes and 16-byte alignment (what Triton specializes them on) and devices are
        still checked on every call (then passed as addresses, see `_tensor_pointers`), and a miss or
        anything unusual takes `run`.
        """
        if _CHECK_PLANS and signature is not None:
            self._check_signature(signature, *build())
        if signature is None or not (_ENABLED and self.usable) or _hooks_installed():
            grid, args, kwargs = build()
            return self.run(grid, args, kwargs)
        key = (torch.cuda.current_device(), signature)
        plan = self.plans.get(key)
        if type(plan) is _Plan:
            values = _tensor_pointers(plan, tensors)
            if values is not None:
                entry = plan.entry
                if self._current(entry):
                    self.hits += 1
                    if entry.pre_hook is not None:
                        named = dict(zip(self.names, values))
                        for slot, t in zip(plan.slots, tensors):
                            named[self.names[slot]] = t
                        self._pre_hook(entry, named)
                    return self._launch_values(entry, plan.grid, values)
        grid, args, kwargs = build()
        # Before the launch: a config pre_hook may change the descriptors (their block shapes), which
        # the launch key and the plan's checks see as the caller made them.
        meta = tuple(_slot_meta(t) for t in tensors)
        try:
            launch_key = self._key(args, kwargs)
        except TypeError:
            launch_key = None
        result = self.run(grid, args, kwargs)
        if plan is None or type(plan) is _Plan:
            if len(self.plans) >= _MAX_ENTRIES:
                self.plans.clear()
            self.plans[key] = self._plan(grid, args, kwargs, tensors, meta, launch_key)
        return result

    def _check_signature(self, signature: tuple, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """FATTN_CHECK_PLANS: raise if an earlier call with `signature` built other arguments than these
        (tensors compared by position only; a callable grid evaluated with every config of the autotuner)."""
        named = {**dict(zip(self.jit.arg_names, args)), **kwargs}
        configs = list(self.autotuner.configs) if self.autotuner is not None else [None]
        grids = {}  # per config (tests may swap an autotuner's configs: compare the configs both calls had)
        for c in configs:
            meta = c.all_kwargs() if c is not None else {}
            grids[tuple(sorted(meta.items()))] = tuple(grid({**named, **meta})) if callable(grid) else tuple(grid)
        # (Tensors by position only: their dtypes and alignment are checked on every planned call.)
        fixed = (tuple(_fixed_part(a) for a in args), tuple(sorted((k, _fixed_part(a)) for k, a in kwargs.items())))
        if len(self.built) >= _MAX_ENTRIES:
            self.built.clear()
        earlier_fixed, earlier_grids = self.built.setdefault(signature, (fixed, grids))
        differ = earlier_fixed != fixed or any(earlier_grids[c] != g for c, g in grids.items() if c in earlier_grids)
        if differ:
            raise RuntimeError(f"launch plan of {self.jit.__name__}: calls with one signature built different "
                               f"arguments, so the signature misses something they depend on (a plan would "
                               f"launch stale ones).\nsignature: {signature!r}\nfirst: {earlier_fixed!r} "
                               f"{earlier_grids!r}\nnow:   {fixed!r} {grids!r}")
        earlier_grids.update(grids)

    def _plan(self, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              tensors: tuple[torch.Tensor | TensorDescriptor, ...], meta: tuple[tuple[Any, ...], ...],
              launch_key: tuple | None) -> _Plan | object:
        """The plan of a launch `run` just made (`meta`, `launch_key`: its tensors' `_slot_meta` and its
        launch key, taken before it), or _UNCACHEABLE (e.g. `tensors` not the launch's tensors and
        descriptors in parameter order)."""
        if len(meta) != len(tensors) or launch_key is None:
            return _UNCACHEABLE
        entry = self.cache.get((torch.cuda.current_device(), launch_key))
        if type(entry) is not _Entry:
            return _UNCACHEABLE
        values = self._values(entry, args, kwargs)
        slots = tuple(i for i, a in enumerate(values) if isinstance(a, (torch.Tensor, TensorDescriptor)))
        if len(slots) != len(tensors) or any(values[i] is not t for i, t in zip(slots, tensors)):
            return _UNCACHEABLE
        grid = self._grid3(grid, values)
        for i in slots:
            values[i] = None  # the plan keeps no tensor alive
        return _Plan(entry, grid, values, slots, meta)  # type: ignore[arg-type]

    # Launch ------------------------------------------------------------------------------------
    def run(self, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not (_ENABLED and self.usable):
            return self.kernel[grid](*args, **kwargs)
        if _hooks_installed():
            return self.kernel[grid](*args, **kwargs)
        try:
            key = self._key(args, kwargs)
            if key is not None:
                key = (torch.cuda.current_device(), key)
                entry = self.cache.get(key)
        except TypeError:  # an unhashable argument: not modelled
            key = None
        if key is None:
            return self.kernel[grid](*args, **kwargs)
        if entry is _UNCACHEABLE:
            return self.kernel[grid](*args, **kwargs)
        # The key holds the autotuner's key values: only replaced configs or a cleared or re-tuned autotuner differ.
        if entry is not None and not self._current(entry):
            entry = None
        if entry is None:
            return self._first_launch(grid, args, kwargs, key)
        self.hits += 1
        return self._launch(entry, grid, args, kwargs)  # type: ignore[arg-type]

    def _current(self, entry: _Entry) -> bool:
        """Whether the autotuner would still launch `entry`'s config: its config list is the one the
        entry was picked from (tests replace it to pin one config per kernel path, and a one-config
        list has no tuning key to tell), and a tuned choice is still the cached one."""
        tuner = self.autotuner
        if tuner is None:
            return True
        if tuner.configs is not entry.configs:
            return False
        return entry.tune_key is None or tuner.cache.get(entry.tune_key) is entry.config

    def _first_launch(self, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: tuple) -> Any:
        if len(self.cache) >= _MAX_ENTRIES:
            self.cache.clear()
        compiled = self.kernel[grid](*args, **kwargs)
        config = self.autotuner.best_config if self.autotuner is not None else None
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            self.cache[key] = _UNCACHEABLE
            return compiled
        constexprs = dict(config.all_kwargs()) if config is not None else {}
        constexprs = {k: v for k, v in constexprs.items() if k in self.defaults or k in self.names}
        configs = self.autotuner.configs if self.autotuner is not None else None
        self.cache[key] = _Entry(compiled, config, configs, self._tune_key(args, kwargs), constexprs)
        return compiled

    def _values(self, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """Every parameter's value: the positional args, then keyword args, the config's constexprs, defaults."""
        values = list(args)
        if len(values) < len(self.names):
            rest = {**kwargs, **entry.constexprs}
            for name in self.names[len(values):]:
                values.append(rest[name] if name in rest else self.defaults[name])
        return values

    def _grid3(self, grid: Any, values: list[Any]) -> tuple[int, int, int]:
        """The grid as three ints (a callable grid gets every parameter's value by name)."""
        if callable(grid):
            grid = grid(dict(zip(self.names, values)))
        return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1

    def _launch(self, entry: _Entry, grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        values = self._values(entry, args, kwargs)
        if entry.pre_hook is not None:
            self._pre_hook(entry, dict(zip(self.names, values)))
        return self._launch_values(entry, self._grid3(grid, values), values)

    @staticmethod
    def _pre_hook(entry: _Entry, named: dict[str, Any]) -> None:
        """The config's pre_hook, given what Autotuner.run gives it: every argument by name and the
        config's own keyword arguments."""
        entry.pre_hook({**named, **entry.config.all_kwargs()})

    def _launch_values(self, entry: _Entry, grid: tuple[int, int, int], values: list[Any]) -> Any:
        if self.autotuner is not None:
            self.autotuner.best_config = entry.config
        compiled = entry.compiled
        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        # No launch hooks are installed (checked in run): the launcher gets no metadata and no hooks.
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *values)
        return compiled
