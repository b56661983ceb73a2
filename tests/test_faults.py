"""Fault injection on the LLaMA example: corrupt checkpoints, interrupted
runs, run directories it did not write. Nothing already saved may be lost,
and every failure gives a clear message (llama-tiny, a few steps)."""

import json
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from examples.llama import checkpointing
from examples.llama import input_pipeline as data_lib
from examples.llama import main as main_lib


def _args(out, *extra, steps=4, method="galore"):
  return ["--model", "llama-tiny", "--method", method, "--steps", str(steps),
          "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
          "--eval-batches", "1", "--save-every", "2", "--update-proj-gap",
          "2", "--out", str(out), "--no-progress", *extra]


def _steps(out, method="galore"):
  ckpt = pathlib.Path(out) / method / "ckpt"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _snapshot(out, method="galore"):
  """Every file under the run's checkpoints, with its bytes."""
  root = pathlib.Path(out) / method / "ckpt"
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _restored(out, step, method="galore"):
  mngr = checkpointing.manager(pathlib.Path(out) / method / "ckpt")
  return mngr.restore(step)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4, and its final loss."""
  out = tmp_path_factory.mktemp("finished")
  assert main_lib.main(_args(out)) == 0
  result = json.loads((out / "galore" / "result.json").read_text())
  return out, result["final_val_loss"]


def _copy_run(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_a_fresh_run_never_deletes_existing_checkpoints(finished, tmp_path,
                                                        capsys):
  out = _copy_run(finished[0], tmp_path / "run")
  before = _snapshot(out)
  assert main_lib.main(_args(out)) == 2
  err = capsys.readouterr().err
  assert "already holds checkpoints (steps 2, 4)" in err
  assert "--resume" in err and "nothing was deleted" in err
  assert _snapshot(out) == before


def test_resume_without_the_settings_record_refuses(finished, tmp_path,
                                                    capsys):
  out = _copy_run(finished[0], tmp_path / "run")
  (out / "galore" / "args.json").unlink()  # e.g. ckpt/ copied alone
  before = _snapshot(out)
  assert main_lib.main(_args(out, "--resume", steps=6)) == 2
  err = capsys.readouterr().err
  assert "args.json" in err and "is missing" in err
  assert _snapshot(out) == before


def test_changing_a_state_setting_on_resume_is_refused(finished, tmp_path,
                                                       capsys):
  out = _copy_run(finished[0], tmp_path / "run")
  assert main_lib.main(_args(out, "--resume", "--clip", "1.0",
                              steps=6)) == 2
  err = capsys.readouterr().err
  assert "settings differ" in err and "clip" in err


@pytest.mark.parametrize("how", ["truncate", "delete", "garbage"])
def test_a_corrupt_checkpoint_names_the_newest_intact_one(finished, tmp_path,
                                                          capsys, how):
  out = _copy_run(finished[0], tmp_path / "run")
  step_dir = out / "galore" / "ckpt" / "4"
  files = sorted((p for p in step_dir.rglob("*") if p.is_file()),
                 key=lambda p: -p.stat().st_size)
  target = files[0]  # the largest: array data
  if how == "truncate":
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 3])
  elif how == "delete":
    target.unlink()
  else:
    target.write_bytes(b"\x00garbage" * 16)
  intact = _snapshot(out)
  assert main_lib.main(_args(out, "--resume", steps=6)) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "checkpoint step 4" in err and "corrupt" in err
  assert "newest intact checkpoint is step 2" in err
  assert "--resume --resume-step 2" in err and "Nothing was deleted" in err
  assert _snapshot(out) == intact
  # Resuming from step 2 finishes the run exactly as the uninterrupted one,
  # and the corrupt step 4 is set aside, not deleted.
  assert main_lib.main(_args(out, "--resume", "--resume-step", "2")) == 0
  result = json.loads((out / "galore" / "result.json").read_text())
  assert result["final_val_loss"] == finished[1]
  assert (out / "galore" / "ckpt-set-aside" / "4").is_dir()


def test_non_finite_params_are_never_saved(tmp_path, capsys):
  """A huge learning rate (finite as a Python float, inf in float32) makes
  the params infinite after a step whose loss was still finite."""
  out = tmp_path / "run"
  code = main_lib.main(_args(out, "--lr", "1e39", "--save-every", "1",
                              "--method", "adamw", method="adamw"))
  assert code == 1
  err = capsys.readouterr().err
  assert "became non-finite by step 1: not saved" in err
  assert "No checkpoint was saved" in err
  assert not (out / "adamw" / "ckpt").is_dir() or _steps(out, "adamw") == []


def test_the_last_good_checkpoint_named_after_a_nan_stop_is_finite(
    tmp_path, capsys):
  out = tmp_path / "run"
  assert main_lib.main(_args(out, steps=2, method="adamw")) == 0
  # The learning rate is not part of the state: a resume may change it.
  assert main_lib.main(_args(out, "--resume", "--lr", "1e39",
                              "--save-every", "1", method="adamw")) == 1
  err = capsys.readouterr().err
  assert "became non-finite by step 3: not saved" in err
  assert "The last good checkpoint is step 2" in err
  assert _steps(out, "adamw") == [2]
  train = _restored(out, 2, "adamw")["train"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(train))


def _signals_at(monkeypatch, at_call, count):
  original = data_lib.batch
  calls = {"n": 0}

  def batch(*a, **k):
    calls["n"] += 1
    if calls["n"] == at_call:
      for _ in range(count):
        os.kill(os.getpid(), signal.SIGINT)
    return original(*a, **k)

  monkeypatch.setattr(data_lib, "batch", batch)


def test_one_ctrl_c_saves_and_resumes_exactly(finished, tmp_path,
                                              monkeypatch):
  out = tmp_path / "run"
  with monkeypatch.context() as mp:
    _signals_at(mp, at_call=1, count=1)  # during step 1
    assert main_lib.main(_args(out)) == 130
  assert _steps(out) == [1]
  assert main_lib.main(_args(out, "--resume")) == 0
  result = json.loads((out / "galore" / "result.json").read_text())
  assert result["final_val_loss"] == finished[1]


def test_two_ctrl_c_abort_without_losing_saved_checkpoints(tmp_path,
                                                           monkeypatch):
  out = tmp_path / "run"
  with monkeypatch.context() as mp:
    _signals_at(mp, at_call=3, count=2)  # step 3: after the step-2 save
    with pytest.raises(KeyboardInterrupt):
      main_lib.main(_args(out))
  assert _steps(out) == [2]
  _restored(out, 2)  # intact
  assert main_lib.main(_args(out, "--resume")) == 0


def test_second_ctrl_c_during_a_save_keeps_the_older_checkpoints(
    tmp_path, monkeypatch):
  """The first Ctrl-C asks for a save; the second aborts it midway: the
  partial step is not a checkpoint, the older one resumes."""
  out = tmp_path / "run"
  original = checkpointing.save

  def aborted_save(mngr, step, tree):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
    original(mngr, step, tree)

  with monkeypatch.context() as mp:
    _signals_at(mp, at_call=3, count=1)
    mp.setattr(checkpointing, "save", aborted_save)
    with pytest.raises(KeyboardInterrupt):
      main_lib.main(_args(out))
  assert _steps(out) == [2]
  _restored(out, 2)
  assert main_lib.main(_args(out, "--resume")) == 0


def test_ctrl_c_during_a_save_completes_that_save(finished, tmp_path,
                                                  monkeypatch):
  out = tmp_path / "run"
  original = checkpointing.save

  def interrupted_save(mngr, step, tree):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)  # arrives while saving step 2
    original(mngr, step, tree)

  with monkeypatch.context() as mp:
    mp.setattr(checkpointing, "save", interrupted_save)
    # Step 2's save completes; the Ctrl-C is acted on after step 3, which
    # is saved too.
    assert main_lib.main(_args(out)) == 130
  assert _steps(out) == [2, 3]
  _restored(out, 2)
  _restored(out, 3)
  assert main_lib.main(_args(out, "--resume")) == 0
  result = json.loads((out / "galore" / "result.json").read_text())
  assert result["final_val_loss"] == finished[1]


def _garbage_tokenizer(d):
  (d / "tok.json").write_bytes(os.urandom(300))
  return d / "tok.json"


def _garbage_npy(d):
  (d / "ids.npy").write_bytes(b"\x93NUMPY garbage")
  return d / "ids.npy"


def _under_a_file(d):
  (d / "file").write_text("x")
  return d / "file" / "out"


@pytest.mark.parametrize("make,flag,msg", [
    (_garbage_tokenizer, "--tokenizer", "is not a Hugging Face tokenizer"),
    (_garbage_npy, "--data", "is not a readable token-id file"),
    (_under_a_file, "--out", "is not a writable directory"),
])
def test_bad_input_files_give_one_line_errors(tmp_path, capsys, make, flag,
                                              msg):
  path = make(tmp_path)
  argv = _args(tmp_path / "run", flag, str(path))
  if flag == "--out":
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
  assert main_lib.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


def test_mnist_truncated_data_and_unwritable_out_are_one_line_errors(
    tmp_path, capsys):
  from examples.mnist import train as mnist_train  # pylint: disable=g-import-not-at-top
  src = pathlib.Path(__file__).resolve().parents[2] / "shared/data/mnist.npz"
  data = tmp_path / "mnist.npz"
  if src.is_file():
    data.write_bytes(src.read_bytes()[:100_000])
  else:  # any archive cut short
    np.savez(data, x=np.zeros(50_000, np.uint8))
    data.write_bytes(data.read_bytes()[:1000])
  assert mnist_train.main(["--data", str(data)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "not a readable .npz" in err[0]
  (tmp_path / "file").write_text("x")
  np.savez(tmp_path / "ok.npz",
           x_train=np.zeros((256, 28, 28), np.uint8),
           y_train=np.zeros(256, np.uint8),
           x_test=np.zeros((16, 28, 28), np.uint8),
           y_test=np.zeros(16, np.uint8))
  assert mnist_train.main(["--data", str(tmp_path / "ok.npz"), "--out",
                           str(tmp_path / "file" / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not a writable directory" in err[0]
