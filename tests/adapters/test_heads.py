"""Task heads (``m4d.adapters.heads``), linear and MLP: what is written reads back the same, a
head whose files disagree is refused with the file and the reason, an MLP head's logits are
torch's nn.Sequential on its weights, served through the HeadBank as computed here, and
training fits an MLP where a linear head cannot (XOR-like classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from m4d.adapters.heads import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    Head,
    Hidden,
    read_head,
    train_head,
    write_head,
)
from m4d.adapters.lora import AdapterError
from m4d.executor.adapters import HeadBank

LABELS = ["alarm", "lights", "music"]


def _mlp(dim: int = 8, hidden: int = 5, activation: str = "gelu", seed: int = 0) -> Head:
    gen = torch.Generator().manual_seed(seed)
    return Head(LABELS, torch.randn(3, hidden, generator=gen), torch.randn(3, generator=gen),
                hidden=Hidden(torch.randn(hidden, dim, generator=gen),
                              torch.randn(hidden, generator=gen), activation))


def test_an_mlp_head_reads_back_as_written(tmp_path: Path) -> None:
    head = _mlp(activation="relu")
    head.lora = "enc-lora"
    write_head(tmp_path / "mlp", head)
    assert json.loads((tmp_path / "mlp" / HEAD_CONFIG).read_text()) == {
        "labels": LABELS, "lora": "enc-lora", "hidden": 5, "activation": "relu"}
    again = read_head(tmp_path / "mlp")
    assert again.hidden is not None and again.hidden.activation == "relu"
    assert (again.labels, again.lora, again.dim) == (LABELS, "enc-lora", 8)
    for name, tensor in head.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    # a linear head's files are as they were: two tensors, no hidden layer in head.json
    from safetensors.torch import load_file

    write_head(tmp_path / "linear", Head(LABELS, torch.randn(3, 8), torch.zeros(3)))
    assert set(load_file(str(tmp_path / "linear" / HEAD_WEIGHTS))) == {"weight", "bias"}
    assert json.loads((tmp_path / "linear" / HEAD_CONFIG).read_text()) == {"labels": LABELS}
    linear = read_head(tmp_path / "linear")
    assert linear.hidden is None and linear.dim == 8


def _bad(folder: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / HEAD_CONFIG).write_text(json.dumps({"labels": LABELS, **config}))
    save_file(tensors, str(folder / HEAD_WEIGHTS))
    return folder


MLP = {"hidden.weight": torch.zeros(5, 8), "hidden.bias": torch.zeros(5),
       "weight": torch.zeros(3, 5), "bias": torch.zeros(3)}


@pytest.mark.parametrize(("config", "tensors", "file", "reason"), [
    ({"hidden": 5, "activation": "swish"}, MLP, HEAD_CONFIG,
     "\"activation\" 'swish' is not one of gelu, relu"),
    ({"hidden": 5}, MLP, HEAD_CONFIG, "\"activation\" None is not one of"),
    ({"hidden": -2, "activation": "gelu"}, MLP, HEAD_CONFIG, "an integer, 0 for none"),
    ({"activation": "gelu"}, {"weight": torch.zeros(3, 8), "bias": torch.zeros(3)}, HEAD_CONFIG,
     "an \"activation\" without a hidden layer"),
    ({}, MLP, HEAD_WEIGHTS, r"a linear head in head.json holds \['bias', 'weight'\]"),
    ({"hidden": 5, "activation": "gelu"}, {"weight": torch.zeros(3, 8), "bias": torch.zeros(3)},
     HEAD_WEIGHTS, "a hidden-5 MLP head"),
    ({"hidden": 5, "activation": "gelu"}, {**MLP, "weight": torch.zeros(3, 8)}, HEAD_WEIGHTS,
     r"weight \[3, 8\] must take the hidden layer's 5 outputs"),
    ({"hidden": 5, "activation": "gelu"}, {**MLP, "hidden.bias": torch.zeros(4)}, HEAD_WEIGHTS,
     r"needs hidden.weight \[hidden, dim\] and hidden.bias \[hidden\]"),
    ({"hidden": 6, "activation": "gelu"}, MLP, HEAD_WEIGHTS, "its hidden layer is 5 wide, not 6"),
    ({"hidden": 5, "activation": "gelu"},
     {**MLP, "weight": torch.zeros(2, 5), "bias": torch.zeros(2)}, HEAD_WEIGHTS,
     "for its 3 labels"),
])
def test_a_head_whose_files_disagree_is_refused_naming_the_file(
        tmp_path: Path, config: dict[str, object], tensors: dict[str, torch.Tensor], file: str,
        reason: str) -> None:
    folder = _bad(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match=f"{folder / file}: .*{reason}"):
        read_head(folder)


def test_writing_an_inconsistent_head_is_refused(tmp_path: Path) -> None:
    head = _mlp()
    head.weight = torch.zeros(3, 8)  # the input's width, not the hidden layer's
    with pytest.raises(AdapterError, match="must take the hidden layer's 5 outputs"):
        write_head(tmp_path / "h", head)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(("activation", "module"), [("gelu", torch.nn.GELU()),
                                                    ("relu", torch.nn.ReLU())])
def test_mlp_logits_are_the_torch_reference(activation: str, module: torch.nn.Module) -> None:
    head = _mlp(activation=activation)
    assert head.hidden is not None
    first, last = torch.nn.Linear(8, 5), torch.nn.Linear(5, 3)
    with torch.no_grad():
        first.weight.copy_(head.hidden.weight)
        first.bias.copy_(head.hidden.bias)
        last.weight.copy_(head.weight)
        last.bias.copy_(head.bias)
    reference = torch.nn.Sequential(first, module, last)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(head.logits(x), reference(x), atol=1e-6)
        assert torch.allclose(head.logits(x.double()), reference(x), atol=1e-6)  # as float32


def _xor(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Vectors [n, 8] whose class is the XOR of the signs of their first two coordinates
    (clusters at (±1, ±1), other coordinates noise): no linear head separates them."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1
    x = torch.randn(n, 8, generator=gen) * 0.2
    x[:, :2] += signs
    return x, ["same" if a == b else "other" for a, b in signs.tolist()]


def test_an_mlp_head_trains_where_a_linear_one_cannot() -> None:
    x, y = _xor(400, seed=0)
    held, expected = _xor(200, seed=1)

    def accuracy(head: Head) -> float:
        predicted = [head.labels[i] for i in head.logits(held).argmax(-1).tolist()]
        return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)

    mlp = train_head(x, y, hidden=16, seed=3)
    assert mlp.hidden is not None and mlp.hidden.weight.shape == (16, 8)
    assert mlp.labels == ["other", "same"] and mlp.weight.shape == (2, 16)
    assert accuracy(mlp) >= 0.97
    assert accuracy(train_head(x, y)) < 0.8  # the linear head on the same vectors
    again = train_head(x, y, hidden=16, seed=3)  # seeded: the same head again
    assert all(torch.equal(again.tensors()[k], t) for k, t in mlp.tensors().items())
    relu = train_head(x, y, hidden=16, seed=3, activation="relu")
    assert relu.hidden is not None and relu.hidden.activation == "relu" and accuracy(relu) >= 0.97
    with pytest.raises(AdapterError, match="activation 'tanh' is not one of"):
        train_head(x, y, hidden=16, activation="tanh")


def test_the_head_bank_serves_an_mlp_head_as_computed(tmp_path: Path) -> None:
    head = _mlp(dim=16, hidden=12)
    write_head(tmp_path / "adapters" / "mlp-head", head)
    bank = HeadBank({"mlp-head": {"kind": "head", "dir": "adapters/mlp-head"}},
                    lambda rel: tmp_path / rel)
    vectors = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    labels, logits = bank.logits("mlp-head", vectors)
    assert labels == LABELS and torch.equal(logits, head.logits(vectors))
