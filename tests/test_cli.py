"""train.py as a user runs it: short errors, re-running in a run directory, sweeps that survive a failed job."""
import pytest

from tests.helpers import make_image_folder, read_metrics, run_cli


def assert_short_error(proc, *fragments: str) -> None:
    """The process failed with a message holding every fragment, and printed no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output


@pytest.mark.slow
def test_cli_errors_are_short_and_name_the_fix(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not an image")
    common = (f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=false")
    assert_short_error(run_cli("attention=cbamm", *common), "Available options in 'attention'", "se")
    assert_short_error(run_cli("trainer.resume=/no/such.pt", *common), "checkpoint /no/such.pt does not exist")
    assert_short_error(
        run_cli("data=imagefolder", f"data.root={root}", "data.num_classes=2", "data.num_workers=1",
                "data.image_size=32", *common),
        f"cannot read image {bad}",
    )


@pytest.mark.slow
def test_cli_rerun_in_an_explicit_run_dir_resumes(tmp_path):
    args = [f"hydra.run.dir={tmp_path}", "data.max_train_samples=128", "data.max_val_samples=50",
            "trainer.progress=false", "sched=step"]  # a step schedule may be extended (a cosine one is refused)
    first = run_cli(*args, "trainer.epochs=1")
    assert first.returncode == 0, first.stderr
    second = run_cli(*args, "trainer.epochs=2")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout + second.stderr and "after 2 epochs" in second.stdout + second.stderr
    assert read_metrics(tmp_path)["epoch"] == 2


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    proc = run_cli("-m", "trainer.resume=/no/such.pt,null", f"hydra.sweep.dir={tmp_path}", "trainer.epochs=1",
                   "data.max_train_samples=64", "data.max_val_samples=20", "trainer.progress=false")
    assert proc.returncode == 0, proc.stderr
    statuses = sorted(read_metrics(d)["status"] for d in tmp_path.iterdir() if (d / "metrics.json").exists())
    assert "checkpoint /no/such.pt does not exist" in proc.stdout + proc.stderr
    assert statuses == ["completed", "failed"]
