"""Training extras (#27 item 16): early stopping (--patience), the weight average (--ema), both
resumable, and TensorBoard logging of the curves (--tensorboard)."""

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import offroad_seg.training.loop as loop
from offroad_seg.cli import cli
from offroad_seg.errors import ConfigError, Interrupted, OffroadSegError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.training.early_stop import EarlyStopping
from offroad_seg.training.ema import HeadEMA
from offroad_seg.training.validation import evaluate_on_cache
from tests.conftest import interrupted_in_epoch
from tests.training.test_train import train_config

# a scripted val mIoU per epoch: best at epoch 1 (epoch 3 only ties it), so --patience 2 stops
# the run after epoch 3 of 5
SCRIPT = [0.30, 0.20, 0.30, 0.25, 0.90]


@pytest.fixture(autouse=True)
def placeholder_plots(monkeypatch):
    """The final stats' figures as empty files: matplotlib would take most of these tests'
    time, and tests/reporting covers the figures."""
    from offroad_seg.reporting import plots

    def touch(*args, **kwargs):
        path = next(a for a in args if hasattr(a, "write_bytes"))
        path.write_bytes(b"")

    monkeypatch.setattr(plots, "plot_training_curves", touch)
    monkeypatch.setattr(plots, "plot_per_class_metrics", touch)


@pytest.fixture
def scripted_miou(monkeypatch):
    """validate_epoch as it is, then the epoch's val mIoU replaced by SCRIPT's."""
    real = loop.validate_epoch

    def scripted(head, data, weight, world, row):
        out = real(head, data, weight, world, row)
        row["val_miou"] = SCRIPT[row["epoch"] - 1]
        return out

    monkeypatch.setattr(loop, "validate_epoch", scripted)


def run(caches, out, **kw):
    return loop.train(train_config([caches["train"]], out, head="linear", **kw))


def killed_then_resumed(caches, tmp_path, kill_in: int, **kw):
    """The same run uninterrupted and killed in epoch `kill_in` (computed, not saved) then
    resumed: (uninterrupted, resumed) results."""
    full = run(caches, tmp_path / "full", **kw)
    with (
        interrupted_in_epoch(kill_in),
        pytest.raises(Interrupted, match=f"holds epoch {kill_in - 1} of"),
    ):
        run(caches, tmp_path / "part", **kw)
    resumed = run(caches, tmp_path / "part", resume=True, **kw)
    assert resumed.step_losses == full.step_losses[-len(resumed.step_losses) :]
    assert resumed.history == [
        {**r, "seconds": s["seconds"]} for r, s in zip(full.history, resumed.history, strict=True)
    ]
    for name in ("last.pth", "segmentation_head.pth"):
        a = load_checkpoint(tmp_path / "full" / name).payload
        b = load_checkpoint(tmp_path / "part" / name).payload
        assert a["epoch"] == b["epoch"]
        for key in ("state_dict", "trained_state_dict"):
            for k in a.get(key, {}):
                torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0)
    return full, resumed


def test_patience_rule():
    assert not EarlyStopping(0).should_stop(50, {"epoch": 1})
    assert not EarlyStopping(2).should_stop(3, {"epoch": 2})
    assert EarlyStopping(2).should_stop(4, {"epoch": 2})
    assert not EarlyStopping(2).should_stop(4, None)  # no validation: nothing to stop on
    with pytest.raises(ConfigError, match="--patience -1"):
        EarlyStopping(-1)


def test_patience_stops_at_the_right_epoch_and_resumes(caches, tmp_path, scripted_miou):
    kw = dict(epochs=5, patience=2, val_cache=caches["val"])
    full, resumed = killed_then_resumed(caches, tmp_path, kill_in=3, **kw)
    assert [r["epoch"] for r in full.history] == [1, 2, 3]
    assert full.best["epoch"] == 1 and full.stopped_early and resumed.stopped_early
    assert resumed.epochs_trained == 1  # epoch 3, then the same stop
    last = load_checkpoint(tmp_path / "full" / "last.pth").payload
    assert last["epoch"] == 3 and last["stopped_early"] is True
    assert load_checkpoint(tmp_path / "full" / "segmentation_head.pth").payload["epoch"] == 1
    # a stopped run is finished: --resume has nothing to do, a plain rerun is refused
    again = run(caches, tmp_path / "full", resume=True, **kw)
    assert again.epochs_trained == 0 and len(again.history) == 3 and again.stopped_early
    # killed while writing its stats: the rerun writes them, and trains nothing more
    (tmp_path / "full" / "train_stats" / "history.csv").unlink()
    again = run(caches, tmp_path / "full", **kw)
    assert again.epochs_trained == 0 and again.completed == ["train_stats/history.csv"]
    assert len((tmp_path / "full" / "train_stats" / "history.csv").read_text().splitlines()) == 4
    r = CliRunner().invoke(
        cli, ["train", str(caches["train"]), str(tmp_path / "full"), "--resume", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert (
        f"{tmp_path / 'full'}: training already stopped early at epoch 3; nothing to do" in r.stdout
    )
    with pytest.raises(OffroadSegError, match="stopped early at epoch 3 of a run"):
        run(caches, tmp_path / "full", **kw)
    with pytest.raises(ConfigError, match="needs --val-cache"):
        run(caches, tmp_path / "noval", epochs=2, patience=1)


def test_ema_update_is_the_decayed_average():
    head = torch.nn.Linear(3, 2)
    ema = HeadEMA(head, 0.75)
    expected = {k: v.detach().double().clone() for k, v in head.state_dict().items()}
    rng = np.random.default_rng(0)
    for _ in range(4):
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.from_numpy(rng.normal(size=p.shape)))
        ema.update()
        for k, v in head.state_dict().items():
            expected[k] = 0.75 * expected[k] + 0.25 * v.double()
    for k, v in ema.state_dict().items():
        np.testing.assert_allclose(v.numpy(), expected[k].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="--ema 1"):
        HeadEMA(head, 1.0)


def test_ema_of_a_run_equals_the_decayed_average_of_its_steps(caches, tmp_path, monkeypatch):
    steps = []  # the trained weights after every optimizer step
    real_update = HeadEMA.update

    def recording(self):
        steps.append({k: v.detach().double().clone() for k, v in self.head.state_dict().items()})
        real_update(self)

    monkeypatch.setattr(HeadEMA, "update", recording)
    decay = 0.8
    result = run(caches, tmp_path / "e", epochs=2, ema=decay)
    assert len(steps) == len(result.step_losses) > 4
    saved = load_checkpoint(tmp_path / "e" / "segmentation_head.pth")
    torch.manual_seed(0)  # the head as the run built it (seed 0), where the average starts
    built = build_head(HeadConfig.from_dict(saved.payload["head_config"])).state_dict()
    floats = [k for k, v in built.items() if v.is_floating_point()]  # counters are copied
    average = {k: built[k].double() for k in floats}
    for weights in steps:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in floats}
    last = load_checkpoint(tmp_path / "e" / "last.pth").payload
    for k, v in saved.payload["state_dict"].items():  # no validation: the last epoch's head
        if k not in floats:
            continue
        np.testing.assert_allclose(v.numpy(), average[k].numpy(), rtol=0, atol=1e-6)
        torch.testing.assert_close(last["state_dict"][k], v, rtol=0, atol=0)
        torch.testing.assert_close(last["trained_state_dict"][k].double(), steps[-1][k])
    assert any(
        not torch.allclose(saved.payload["state_dict"][k].double(), steps[-1][k]) for k in floats
    )


def test_ema_resumes_exactly_and_validates_the_average(caches, tmp_path):
    kw = dict(epochs=2, ema=0.9, val_cache=caches["val"])
    full, _ = killed_then_resumed(caches, tmp_path, kill_in=2, **kw)
    # the best epoch's numbers are the averaged head's, scored afresh here
    ckpt = load_checkpoint(tmp_path / "full" / "segmentation_head.pth")
    weight = torch.tensor(ckpt.payload["class_weights"], dtype=torch.float32)
    fresh = evaluate_on_cache(
        ckpt.build(), FeatureCache.open(caches["val"]), torch.device("cpu"), weight
    )
    assert fresh.miou == pytest.approx(full.best["val_miou"], abs=1e-12)
    assert fresh.miou == pytest.approx(ckpt.payload["val_metrics"]["miou"], abs=1e-12)


def test_tensorboard_holds_the_epoch_curves(caches, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(
        caches, tmp_path / "t", epochs=2, val_cache=caches["val"], tensorboard=tmp_path / "tb"
    )
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for tag, key in (("train/loss", "train_loss"), ("val/miou", "val_miou"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        expected = [r[key] for r in result.history]
        np.testing.assert_allclose([s.value for s in scalars], expected, rtol=1e-6)


def test_tensorboard_missing_is_one_line_before_any_work(caches, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    out = tmp_path / "run"
    r = CliRunner().invoke(
        cli,
        ["train", str(caches["train"]), str(out), "--tensorboard", str(tmp_path / "tb")],
    )
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package, which is not installed: "
        "pip install 'offroad-seg[tensorboard]' (or pip install tensorboard)"
    ]
    assert not out.exists() and not (tmp_path / "tb").exists()
