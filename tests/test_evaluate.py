"""Classification metrics computed without torchmetrics (a dense extra) agree with torchmetrics on the same
logits."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from fcaformer.train.evaluate import evaluate


class Fixed(nn.Module):
    """Returns stored logits for the sample indices it is given (a model whose outputs the test chooses)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]


def test_evaluate_matches_torchmetrics() -> None:
    classes, count = 7, 203
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(count, classes, generator=generator)
    targets = torch.randint(0, classes, (count,), generator=generator)
    targets[targets == 6] = 5  # class 6 has no sample: its accuracy must be 0, not NaN
    logits[:50] += 3 * torch.nn.functional.one_hot(targets[:50], classes)  # some right answers
    loader = DataLoader(TensorDataset(torch.arange(count), targets), batch_size=32)
    result = evaluate(Fixed(logits), loader, classes, torch.device("cpu"))
    top1 = MulticlassAccuracy(classes, top_k=1, average="micro")(logits, targets).item()
    top5 = MulticlassAccuracy(classes, top_k=5, average="micro")(logits, targets).item()
    per_class = MulticlassAccuracy(classes, average=None)(logits, targets)
    confusion = MulticlassConfusionMatrix(classes)(logits, targets)
    loss = MeanMetric()(torch.nn.functional.cross_entropy(logits, targets, reduction="none")).item()
    assert result.images == count
    assert abs(result.top1 - 100 * top1) < 1e-4 and abs(result.top5 - 100 * top5) < 1e-4
    assert abs(result.loss - loss) < 1e-5
    assert result.confusion == confusion.tolist()
    assert torch.allclose(torch.tensor(result.per_class_acc, dtype=torch.float64), 100 * per_class.double(), atol=1e-4)
    assert result.per_class_acc[6] == 0.0
