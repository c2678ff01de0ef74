"""fattn.core.launch: remembered-kernel launches give what Triton's own launch path gives."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fattn.core.launch import clear_launch_caches, fast_launch_enabled, launcher
from fattn.core.testing import device, on_gpu


@pytest.fixture(autouse=True)
def _fast_launch_on():  # type: ignore[no-untyped-def]
    """These tests are about the shortcut: on for each, whatever FATTN_FAST_LAUNCH says."""
    previous = fast_launch_enabled(True)
    yield
    fast_launch_enabled(previous)


@triton.jit
def _axpb_kernel(x_ptr, y_ptr, n, a, stride, BLOCK: tl.constexpr, ADD_ONE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride, mask=mask).to(tl.float32)
    y = a * x + (1.0 if ADD_ONE else 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# The same kernel behind an autotuner (BLOCK comes from the config).
_tuned_axpb_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": 32}, num_warps=1), triton.Config({"BLOCK": 64}, num_warps=2)], key=["n"],
)(_axpb_kernel)


def _output(x: torch.Tensor, stride: int) -> tuple[int, torch.Tensor]:
    """(n, y): the number of strided elements of x and a NaN-filled output for them."""
    n = (x.numel() + stride - 1) // stride
    return n, torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)


def _run(kernel, x: torch.Tensor, stride: int, a: float, add_one: bool, **kw):  # type: ignore[no-untyped-def]
    n, y = _output(x, stride)

    def grid(meta):  # type: ignore[no-untyped-def]
        return (triton.cdiv(n, meta["BLOCK"]),)

    launcher(kernel)[grid](x, y, n, a, stride, ADD_ONE=add_one, **kw)
    return y


def _fresh_axpb(tuned: bool) -> tuple:  # type: ignore[type-arg]
    """(kernel, its keyword arguments) of the jit or autotuned axpb kernel, with no launch remembered
    (the autotuned one skips the test off a GPU: the autotuner times configs on a GPU)."""
    if tuned and not on_gpu():
        pytest.skip("the autotuner times configs on a GPU")
    clear_launch_caches()
    return (_tuned_axpb_kernel, {}) if tuned else (_axpb_kernel, {"BLOCK": 64})


@pytest.mark.parametrize("tuned", [False, True], ids=["jit", "autotuned"])
def test_remembered_launches_match_the_reference(tuned: bool) -> None:
    """Argument changes that change Triton's specialization (alignment, dtype, ints equal to 1 or
    multiples of 16, constexprs) must never reuse a kernel compiled for other ones."""
    kernel, kw = _fresh_axpb(tuned)
    base = torch.randn(300, device=device())
    for x in (base, base[1:], base[3:], base.half(), base[:1], base[:16], base[:17]):
        for stride in (1, 2, 16):
            for add_one in (False, True):
                for _ in range(2):  # the second launch takes the remembered kernel on a GPU
                    y = _run(kernel, x, stride, 0.5, add_one, **kw)
                    want = 0.5 * x[::stride].float() + (1.0 if add_one else 0.0)
                    torch.testing.assert_close(y.float(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_retuned_autotuner_is_not_bypassed() -> None:
    """A cleared autotuner cache sends the next launch through the autotuner again."""
    if not on_gpu():
        pytest.skip("needs a GPU")
    x = torch.randn(1000, device=device())
    _run(_tuned_axpb_kernel, x, 1, 2.0, False)
    _run(_tuned_axpb_kernel, x, 1, 2.0, False)
    first = _tuned_axpb_kernel.best_config
    configs = list(_tuned_axpb_kernel.configs)
    other = next(c for c in configs if c is not first)
    _tuned_axpb_kernel.cache.clear()
    _tuned_axpb_kernel.configs = [other]
    try:
        y = _run(_tuned_axpb_kernel, x, 1, 2.0, False)
        assert _tuned_axpb_kernel.best_config is other
        torch.testing.assert_close(y, 2.0 * x)
    finally:
        _tuned_axpb_kernel.configs = configs
        _tuned_axpb_kernel.cache.clear()


def test_switch() -> None:
    previous = fast_launch_enabled(False)
    try:
        x = torch.randn(50, device=device())
        torch.testing.assert_close(_run(_axpb_kernel, x, 1, 3.0, True, BLOCK=32), 3.0 * x + 1.0)
    finally:
        fast_launch_enabled(previous)
    assert fast_launch_enabled() is previous


@pytest.mark.gpu
def test_second_launch_takes_the_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """After one launch, the same launch key does not go through Triton's launch path again."""
    if not on_gpu():
        pytest.skip("needs a GPU")
    x = torch.randn(100, device=device())
    _run(_axpb_kernel, x, 1, 1.0, False, BLOCK=32)
    fast = launcher(_axpb_kernel)
    slow_calls: list[tuple] = []
    first_launch = fast._first_launch

    def spy(*args):  # type: ignore[no-untyped-def]
        slow_calls.append(args)
        return first_launch(*args)

    monkeypatch.setattr(fast, "_first_launch", spy)
    y = _run(_axpb_kernel, x, 1, 1.0, False, BLOCK=32)
    assert launcher(_axpb_kernel) is fast and slow_calls == [] and torch.equal(y, x)
    _run(_axpb_kernel, x, 1, 1.0, True, BLOCK=32)  # another constexpr: a new key, the slow path once
    assert len(slow_calls) == 1


def test_launch_keys_are_as_specific_as_triton() -> None:
    """Runs without a GPU: the keys of a compiled (not interpreted) kernel, in a subprocess."""
    from pathlib import Path

    from fattn.core.compile_check import run_compile_script

    res = run_compile_script(Path(__file__).with_name("launch_key_script.py"))
    assert res.returncode == 0, res.stdout + res.stderr


def _run_planned(kernel, x: torch.Tensor, stride: int, a: float, add_one: bool, builds: list | None = None,
                 **kw):  # type: ignore[no-untyped-def]
    """_run through launch_planned, signed by what fixes the non-tensor arguments and the grid."""
    n, y = _output(x, stride)

    def build():  # type: ignore[no-untyped-def]
        if builds is not None:
            builds.append(n)
        return (lambda meta: (triton.cdiv(n, meta["BLOCK"]),)), (x, y, n, a, stride), dict(ADD_ONE=add_one, **kw)

    launcher(kernel).launch_planned((n, stride, a, add_one, tuple(kw.items())), (x, y), build)
    return y


@pytest.mark.parametrize("tuned", [False, True], ids=["jit", "autotuned"])
def test_planned_launches_match_the_reference(tuned: bool) -> None:
    """One signature, tensors of other dtypes or alignments: the plan must not launch the kernel
    compiled for the first ones (its tensor checks send such calls through the normal path)."""
    kernel, kw = _fresh_axpb(tuned)
    base = torch.randn(301, device=device())
    for x in (base[:300], base[1:], base[:300].half(), base[1:].half(), base[:300]):
        for _ in range(2):
            y = _run_planned(kernel, x, 2, 0.5, True, **kw)
            torch.testing.assert_close(y.float(), 0.5 * x[::2].float() + 1.0, rtol=1e-3, atol=1e-3)


def test_incomplete_plan_signatures_are_caught() -> None:
    """FATTN_CHECK_PLANS (on in every fattn test run, CPU interpreter included): two calls with one
    signature that build different arguments raise, since a plan would launch the first one's."""
    from fattn.core import launch

    assert launch._CHECK_PLANS, "the test plugin sets FATTN_CHECK_PLANS=1"
    clear_launch_caches()
    x = torch.randn(100, device=device())
    n, y = _output(x, 1)

    def build(a: float):  # type: ignore[no-untyped-def]
        return (lambda meta: (triton.cdiv(n, meta["BLOCK"]),)), (x, y, n, a, 1), dict(ADD_ONE=False, BLOCK=32)

    launcher(_axpb_kernel).launch_planned(("axpb", n), (x, y), lambda: build(2.0))
    launcher(_axpb_kernel).launch_planned(("axpb", n), (x, y), lambda: build(2.0))  # same arguments: fine
    with pytest.raises(RuntimeError, match="the signature misses something"):
        launcher(_axpb_kernel).launch_planned(("axpb", n), (x, y), lambda: build(3.0))  # `a` is not in it
    with launch.checking_plans(False):  # (benchmarks turn the check off)
        launcher(_axpb_kernel).launch_planned(("axpb", n), (x, y), lambda: build(3.0))
    assert launch._CHECK_PLANS
    clear_launch_caches()


@pytest.mark.gpu
def test_planned_launch_builds_once() -> None:
    """The second call with a signature neither builds its arguments nor takes Triton's path; a
    cleared autotuner (a re-tune) is not bypassed."""
    if not on_gpu():
        pytest.skip("needs a GPU")
    from fattn.core import launch

    with launch.checking_plans(False):  # the check (on in every test run) rebuilds arguments on purpose
        _planned_launch_builds_once()


def _planned_launch_builds_once() -> None:
    clear_launch_caches()
    x = torch.randn(1000, device=device())
    builds: list[int] = []
    fast = launcher(_tuned_axpb_kernel)
    _run_planned(_tuned_axpb_kernel, x, 1, 2.0, False, builds)
    hits = fast.hits
    y = _run_planned(_tuned_axpb_kernel, x.clone(), 1, 2.0, False, builds)
    assert builds == [1000] and fast.hits == hits + 1
    torch.testing.assert_close(y, 2.0 * x)
    configs = list(_tuned_axpb_kernel.configs)
    other = next(c for c in configs if c is not _tuned_axpb_kernel.best_config)
    _tuned_axpb_kernel.cache.clear()
    _tuned_axpb_kernel.configs = [other]
    try:
        y = _run_planned(_tuned_axpb_kernel, x, 1, 2.0, False, builds)
        assert _tuned_axpb_kernel.best_config is other and builds == [1000, 1000]
        torch.testing.assert_close(y, 2.0 * x)
    finally:
        _tuned_axpb_kernel.configs = configs
        _tuned_axpb_kernel.cache.clear()


@pytest.mark.gpu
def test_planned_launch_checks_each_tensors_device() -> None:
    """Planned launches pass tensors as addresses (Triton's launcher then skips its driver check of
    each pointer): a tensor on another device than the plan's, a CPU one above all, must not be
    served by the plan."""
    if not on_gpu():
        pytest.skip("needs a GPU")
    from fattn.core.launch import _Plan, _tensor_pointers

    clear_launch_caches()
    x = torch.randn(300, device=device())
    fast = launcher(_axpb_kernel)
    _run_planned(_axpb_kernel, x, 1, 2.0, False, BLOCK=64)
    hits = fast.hits
    y = _run_planned(_axpb_kernel, x, 1, 2.0, False, BLOCK=64)
    assert fast.hits == hits + 1  # the plan served the second call
    torch.testing.assert_close(y, 2.0 * x)

    plan = next(p for p in fast.plans.values() if type(p) is _Plan)
    n, out = _output(x, 1)
    values = _tensor_pointers(plan, (x, out))
    assert values is not None and [values[i] for i in plan.slots] == [x.data_ptr(), out.data_ptr()]
    assert _tensor_pointers(plan, (x.cpu(), out)) is None
    assert _tensor_pointers(plan, (x, out.cpu())) is None
    assert _tensor_pointers(plan, (x.half(), out)) is None  # dtype
    assert _tensor_pointers(plan, (x,)) is None  # count


@pytest.mark.gpu
def test_replaced_configs_are_not_served_by_a_plan() -> None:
    """Tests pin one config per kernel path by replacing an autotuner's config list. A one-config list
    has no tuning key, so only the list's identity tells a remembered kernel (or plan) from the one the
    new list asks for: each pinned config must be the one launched."""
    if not on_gpu():
        pytest.skip("needs a GPU")
    clear_launch_caches()
    x = torch.randn(1000, device=device())
    configs = list(_tuned_axpb_kernel.configs)
    assert len(configs) >= 2
    try:
        for config in configs[:2]:
            _tuned_axpb_kernel.configs = [config]
            for _ in range(2):  # the second call may take the plan
                y = _run_planned(_tuned_axpb_kernel, x, 1, 2.0, False)
                assert _tuned_axpb_kernel.best_config is config
                torch.testing.assert_close(y, 2.0 * x)
                y = _run(_tuned_axpb_kernel, x, 1, 2.0, False)  # and the launch-key path
                assert _tuned_axpb_kernel.best_config is config
    finally:
        _tuned_axpb_kernel.configs = configs
        _tuned_axpb_kernel.cache.clear()
        clear_launch_caches()


def _set_desc_block(nargs: dict) -> None:  # type: ignore[type-arg]
    """Config pre_hook: the descriptor's tile follows the config's BLOCK (as fattn.fp8's does)."""
    nargs["x_desc"].block_shape = [nargs["BLOCK"], nargs["COLS"]]


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=4, pre_hook=_set_desc_block),
                          triton.Config({"BLOCK": 32}, num_warps=4, pre_hook=_set_desc_block)], key=["n"])
@triton.jit
def _desc_scale_kernel(y_ptr, n, a, x_desc=None, BLOCK: tl.constexpr = 16, COLS: tl.constexpr = 16):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, COLS)
    tile = x_desc.load([tl.program_id(0) * BLOCK, 0])  # rows past n come as zeros
    tl.store(y_ptr + rows[:, None] * COLS + cols[None, :], a * tile, mask=rows[:, None] < n)


def _run_desc_planned(x: torch.Tensor, a: float) -> torch.Tensor:
    """y = a * x through a TMA descriptor made per call with a placeholder tile (the pre_hook sets it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, cols = x.shape
    y = torch.full_like(x, float("nan"))
    desc = TensorDescriptor.from_tensor(x, block_shape=[16, cols])

    def build():  # type: ignore[no-untyped-def]
        return (lambda meta: (triton.cdiv(n, meta["BLOCK"]),)), (y, n, a), dict(x_desc=desc, COLS=cols)

    launcher(_desc_scale_kernel).launch_planned(("desc", n, cols, a), (y, desc), build)
    return y


@pytest.mark.gpu
def test_planned_launches_with_descriptors_and_pre_hooks() -> None:
    """Host TMA descriptors (new per call, so a plan takes them as it takes tensors) and configs with a
    pre_hook (run before every launch): planned launches take the shortcut and give Triton's result,
    for fresh inputs and descriptors; one of another dtype is not served by the plan."""
    if not on_gpu() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a GPU with TMA (sm_90+)")
    from fattn.core import launch

    clear_launch_caches()
    fast = launcher(_desc_scale_kernel)
    with launch.checking_plans(False):
        for i in range(4):
            x = torch.randn(100, 16, device=device())
            hits = fast.hits
            y = _run_desc_planned(x, 0.5)
            torch.testing.assert_close(y, 0.5 * x)
            if i:
                assert fast.hits == hits + 1, "a repeated signature must take the plan"
        x = torch.randn(100, 16, device=device()).half()
        torch.testing.assert_close(_run_desc_planned(x, 0.5), 0.5 * x)
    clear_launch_caches()


def test_plans_with_descriptors_pass_the_signature_check() -> None:
    """FATTN_CHECK_PLANS compares descriptors by everything but their base's address (fresh descriptors
    over fresh tensors are the same plan), and tells another shape apart."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fattn.core import launch

    assert launch._CHECK_PLANS, "the test plugin sets FATTN_CHECK_PLANS=1"
    clear_launch_caches()
    fast = launcher(_desc_scale_kernel)

    def build(x: torch.Tensor):  # type: ignore[no-untyped-def]
        desc = TensorDescriptor.from_tensor(x, block_shape=[16, 16])
        return (lambda meta: (triton.cdiv(100, meta["BLOCK"]),)), (x, 100, 0.5), dict(x_desc=desc, COLS=16)

    x = torch.zeros(100, 16)
    fast._check_signature(("d",), *build(x))
    fast._check_signature(("d",), *build(torch.ones(100, 16)))
    with pytest.raises(RuntimeError, match="the signature misses something"):
        fast._check_signature(("d",), *build(torch.zeros(100, 32)[:, :16]))  # other row stride
    clear_launch_caches()
