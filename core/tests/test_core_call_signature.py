"""fattn.core.call_signature and CheckedSignatures: what an op's once-per-signature checks and launch
plans are keyed on (CPU only: nothing here launches a kernel)."""

import pytest
import torch

from fattn.core import CheckedSignatures, call_signature


def test_equal_metadata_gives_equal_signatures() -> None:
    a, b = torch.randn(3, 5), torch.randn(3, 5)  # other values, same metadata
    assert call_signature(a, 2, "zeros", 0.5, True, None) == call_signature(b, 2, "zeros", 0.5, True, None)


@pytest.mark.parametrize("other", ["shape", "strides", "dtype", "requires_grad", "value", "type"])
def test_each_part_of_the_metadata_counts(other: str) -> None:
    x = torch.randn(4, 6)
    variants = {
        "shape": (torch.randn(4, 7), 2),
        "strides": (torch.randn(6, 4).t(), 2),  # same shape [4, 6], transposed strides
        "dtype": (x.half(), 2),
        "requires_grad": (x.clone().requires_grad_(True), 2),
        "value": (x, 3),
        "type": (x, 2.0),  # 2 == 2.0, but a kernel may be compiled differently for each
    }
    assert call_signature(x, 2) != call_signature(*variants[other])


def test_unmodelled_arguments_give_no_signature() -> None:
    class Sub(torch.Tensor):
        pass

    x = torch.randn(2)
    assert call_signature(x, [1, 2]) is None
    assert call_signature(x.as_subclass(Sub)) is None
    assert call_signature(x, torch.device("cpu")) is None


def test_checked_signatures_remember_and_start_over() -> None:
    seen = CheckedSignatures(limit=2)
    s1, s2, s3 = (call_signature(torch.randn(n)) for n in (1, 2, 3))
    assert s1 not in seen
    seen.add(s1)
    seen.add(s2)
    assert s1 in seen and s2 in seen
    seen.add(s3)  # past the limit: starts over with s3 only
    assert s3 in seen and s1 not in seen and s2 not in seen
    seen.add(None)  # an unmodelled call is never remembered
    assert None not in seen


@pytest.mark.parametrize("limit", [0, -1, 1.5, "8"])
def test_checked_signatures_limit_is_checked(limit: object) -> None:
    with pytest.raises(ValueError, match="limit must be a positive int"):
        CheckedSignatures(limit=limit)  # type: ignore[arg-type]
