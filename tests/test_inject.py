"""minipeft.inject: the model surgery every method shares (LoRA tests exercise it end to end)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from minipeft.inject import (ModulesToSave, adapter_state_dict, check_adapter_name, check_weights,
                             last_names, matches, replace_module)


@pytest.mark.parametrize("name, patterns, expected", [
    ("bert.encoder.layer.0.attention.self.query", ["query"], True),
    ("bert.encoder.layer.0.attention.self.query", ["self.query"], True),
    ("bert.encoder.layer.0.attention.self.query", ["uery"], False),       # a whole part, not a tail
    ("classifier", ["classifier"], True),
    ("layer.0.query", r".*\.0\.query", True),                              # a str is a regex ...
    ("layer.10.query", r".*\.0\.query", False),                            # ... on the whole name
    ("layer.0.query", r"query", False),
])
def test_matches_follows_peft(name, patterns, expected):
    assert matches(name, patterns) is expected


def test_replace_module_puts_the_wrapper_in_place():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    wrapper = nn.Identity()
    assert replace_module(model, "0.0", wrapper) is wrapper and model[0][0] is wrapper


def test_modules_to_save_trains_a_copy_per_adapter():
    head = nn.Linear(3, 2)
    original = head.weight.detach().clone()
    wrapped = ModulesToSave(head)
    wrapped.add_adapter("a")
    wrapped.add_adapter("b")
    wrapped.set_active("a")
    assert wrapped.modules_to_save["a"].weight.requires_grad
    assert not wrapped.modules_to_save["b"].weight.requires_grad
    with torch.no_grad():
        wrapped.modules_to_save["a"].weight.add_(1)
    x = torch.randn(4, 3)
    assert torch.allclose(wrapped(x), x @ (original + 1).T + head.bias)
    assert torch.equal(head.weight, original)  # the original is never trained
    wrapped.set_active(None)
    assert torch.equal(wrapped(x), head(x))
    model = nn.Sequential(wrapped)
    assert set(adapter_state_dict(model, "b")) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("name", ["", "a.b", "update", 3])
def test_unusable_adapter_names_are_refused(name):
    with pytest.raises(ValueError, match="not usable"):
        check_adapter_name(name, {})


def test_a_taken_adapter_name_is_refused():
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        check_adapter_name("x", {"x": object()})


def test_weights_that_do_not_fit_are_named():
    expected = {"a.weight": (2, 3), "b.weight": (4,)}
    check_weights({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}, expected)
    with pytest.raises(ValueError,
                       match=r"missing: b.weight; unexpected: c; wrong shape: a.weight"):
        check_weights({"a.weight": torch.zeros(3, 2), "c": torch.zeros(1)}, expected)


def test_last_names_are_what_a_target_list_can_match():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.ReLU()))
    assert last_names(model.named_modules()) == ""  # indices of a Sequential are not names
    named = [("bert.layer.0.query", None), ("bert.layer.1.query", None), ("classifier", None)]
    assert last_names(named) == "classifier, query"
