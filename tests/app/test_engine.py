"""The training loop's failure path: a non-finite loss stops the run, names the step, and saves nothing."""
import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from losses import DistillationLoss
from maskedkd_app.engine import NonFiniteLossError, evaluate, train_one_epoch


def no_teacher(base: nn.Module) -> DistillationLoss:
    """The loss the training loop takes, with ``base`` as its criterion and no teacher."""
    return DistillationLoss(base, None, "none", 0.0, 1.0)


class NaNAfter(nn.Module):
    """Cross-entropy that turns NaN from a given step on (counted in calls)."""

    def __init__(self, bad_step):
        super().__init__()
        self.bad_step, self.calls = bad_step, 0

    def forward(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 >= self.bad_step else loss


def loader(n=12, batch=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


@pytest.mark.parametrize("print_freq", [1, 10])
def test_non_finite_loss_names_first_bad_step(print_freq):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(model, no_teacher(NaNAfter(bad_step=1)), loader(), opt, torch.device("cpu"), 3,
                        print_freq=print_freq)
    assert info.value.step == 1 and info.value.epoch == 3
    assert "epoch 3, step 1" in str(info.value) and "last good one is kept" in str(info.value)


def test_train_stats_average_the_loss_and_evaluate_counts():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen: the losses are reproducible afterwards
    seen = []

    class Recording(nn.Module):
        def forward(self, outputs, targets):
            loss = nn.functional.cross_entropy(outputs, targets)
            seen.append(float(loss))
            return loss

    model.eval()  # no dropout/drop-path noise; set_training_mode=False keeps it
    stats = train_one_epoch(model, no_teacher(Recording()), loader(), opt, torch.device("cpu"), 0,
                            set_training_mode=False)
    assert stats["loss"] == pytest.approx(sum(seen) / len(seen))
    result = evaluate(loader(), model, torch.device("cpu"))
    x, y = loader(n=12, batch=12).dataset.tensors
    with torch.no_grad():
        want = (model(x).argmax(1) == y).float().mean().item() * 100
    assert result["acc1"] == pytest.approx(want) and result["images"] == 12
