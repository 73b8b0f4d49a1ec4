"""The training loops' loss sums stay on the device and still stop a diverged run, naming the first bad step."""
from __future__ import annotations

import math

import pytest
import torch

from vitpe.engine.loop import LossMeter, NonFiniteLossError


def test_weighted_sums_and_means_of_every_term() -> None:
    meter = LossMeter(("loss", "part"), "cpu", epoch=0)
    for step, (loss, part, w) in enumerate([(1.0, 0.5, 2), (3.0, 1.5, 1), (2.0, 0.0, 1)]):
        meter.update(step, torch.tensor(loss), [torch.tensor(part)], weight=w)
    assert meter.sums() == pytest.approx({"loss": 2 * 1.0 + 3.0 + 2.0, "part": 2 * 0.5 + 1.5, "n": 4})
    assert meter.means() == pytest.approx({"loss": 7.0 / 4, "part": 2.5 / 4})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_first_non_finite_step_is_named_at_the_next_read(bad: float) -> None:
    """Steps 0..9, the loss non-finite from step 4 (index) on, read only at the end: the error names
    step 5 (1-based) and the value, not the later bad steps."""
    meter = LossMeter(("loss",), "cpu", epoch=2)
    for step in range(10):
        loss = torch.tensor(bad if step >= 4 else 1.0)
        meter.update(step, loss * (step + 1), weight=1.0)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 5;") as e:
        meter.sums()
    assert ("nan" if math.isnan(bad) else "inf") in str(e.value)
    with pytest.raises(NonFiniteLossError):  # every later read raises too
        meter.means()


def test_a_finite_run_never_raises_and_gradients_are_untouched() -> None:
    w = torch.ones(3, requires_grad=True)
    meter = LossMeter(("loss",), "cpu", epoch=0)
    loss = (w * 2).sum()
    meter.update(0, loss)
    loss.backward()  # the meter kept a detached copy: the graph is intact
    assert w.grad.tolist() == [2.0, 2.0, 2.0] and meter.means() == {"loss": 6.0}


def test_a_batch_with_no_readable_file_still_moves_the_schedule(caplog) -> None:
    """Three batches, the middle one empty (every file unreadable): the optimizer steps twice, the
    schedule three times, so the last rate is the one planned for the end, with no warning."""
    import warnings

    from vitpe.data.folder import Batch, Skipped
    from vitpe.engine.classification import ClsConfig, train_one_epoch
    from vitpe.engine.optim import build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    full = Batch(torch.randn(2, 3, 2, 2), torch.tensor([0, 1]), [])
    empty = Batch(torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long), [Skipped("a.jpg", "truncated")])
    cfg = ClsConfig()
    cfg.run.epochs = 1
    for first in (full, empty):  # an empty batch first: no optimizer step before the schedule's
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=3, epochs=1)
        planned = [scheduler.lr_lambdas[0](i) for i in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = train_one_epoch(model, [first, empty, full], optimizer, scheduler, torch.nn.CrossEntropyLoss(),
                                  torch.device("cpu"), 0, cfg)
        assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(planned[3])
        assert out["skipped"] == (1 if first is full else 2)
