"""The MNIST example: loaders, a short training run per method, plots."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from examples.mnist import data as data_lib
from examples.mnist import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist.npz"


def _fake(n_train=50, n_test=20, seed=0):
  rng = np.random.default_rng(seed)
  img = lambda n: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  lab = lambda n: rng.integers(0, 10, n, dtype=np.uint8)
  return data_lib.MNIST(img(n_train), lab(n_train), img(n_test), lab(n_test))


def _write_idx(path, array, gz):
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(
      array.shape, ">u4").tobytes()
  raw = header + array.tobytes()
  if gz:
    path = path.with_name(path.name + ".gz")
    raw = gzip.compress(raw)
  path.write_bytes(raw)
  return path


def _write_dir(directory, mnist, gz):
  directory.mkdir(parents=True, exist_ok=True)
  for key, stem in data_lib.FILES.items():
    _write_idx(directory / stem, getattr(mnist, key), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_and_npz_read_the_same_arrays(tmp_path, gz):
  mnist = _fake()
  _write_dir(tmp_path / "idx", mnist, gz)
  np.savez(tmp_path / "mnist.npz", **mnist._asdict())
  for loaded in (data_lib.load(tmp_path / "idx"),
                 data_lib.load(tmp_path / "mnist.npz"),
                 data_lib.load(tmp_path)):  # a directory with mnist.npz
    for a, b in zip(loaded, mnist):
      np.testing.assert_array_equal(a, b)


def test_corrupt_or_misshaped_files_give_clear_errors(tmp_path):
  mnist = _fake()
  d = tmp_path / "idx"
  _write_dir(d, mnist, gz=True)
  bad = d / "train-images-idx3-ubyte.gz"
  bad.write_bytes(bad.read_bytes()[:100])  # truncated gzip
  with pytest.raises(data_lib.DataError, match="cannot read"):
    data_lib.load(d)
  _write_idx(d / "train-images-idx3-ubyte", mnist.x_train, gz=False)
  bad.unlink()
  raw = (d / "train-images-idx3-ubyte").read_bytes()
  (d / "train-images-idx3-ubyte").write_bytes(raw[:-7])  # short data
  with pytest.raises(data_lib.DataError, match="header says"):
    data_lib.load(d)
  (d / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
  with pytest.raises(data_lib.DataError, match="bad magic"):
    data_lib.load(d)
  (d / "train-images-idx3-ubyte").unlink()
  with pytest.raises(data_lib.DataError, match="missing IDX files"):
    data_lib.load(d)

  arrays = mnist._asdict()
  np.savez(tmp_path / "a.npz", **{**arrays, "x_train": arrays["x_train"][:,
                                                                        :27]})
  with pytest.raises(data_lib.DataError, match="x_train has shape"):
    data_lib.load(tmp_path / "a.npz")
  np.savez(tmp_path / "b.npz", **{**arrays, "y_test": arrays["y_test"][:5]})
  with pytest.raises(data_lib.DataError, match="y_test has shape"):
    data_lib.load(tmp_path / "b.npz")
  np.savez(tmp_path / "c.npz", **{**arrays, "y_train": arrays["y_train"] + 10})
  with pytest.raises(data_lib.DataError, match="label"):
    data_lib.load(tmp_path / "c.npz")
  np.savez(tmp_path / "d.npz", x_train=arrays["x_train"])
  with pytest.raises(data_lib.DataError, match="missing keys"):
    data_lib.load(tmp_path / "d.npz")
  (tmp_path / "e.npz").write_bytes(b"not a zip file")
  with pytest.raises(data_lib.DataError, match="not a readable .npz"):
    data_lib.load(tmp_path / "e.npz")
  np.savez(tmp_path / "f.npz", **{**arrays, "x_test": arrays["x_test"] * 1.0})
  with pytest.raises(data_lib.DataError, match="dtype float64"):
    data_lib.load(tmp_path / "f.npz")
  with pytest.raises(data_lib.DataError, match="does not exist"):
    data_lib.load(tmp_path / "nope.npz")


def test_no_data_and_no_network_says_where_to_put_files(tmp_path,
                                                        monkeypatch):
  monkeypatch.setattr(data_lib, "DEFAULT_DIR", tmp_path / "cache")
  monkeypatch.setattr(data_lib, "MIRRORS", ("http://127.0.0.1:9/",))
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load()
  assert "download failed" in str(e.value)
  assert str(tmp_path / "cache") in str(e.value) and "--data" in str(e.value)
  assert not list((tmp_path / "cache").iterdir())  # nothing partial kept


def test_download_is_verified(tmp_path, monkeypatch):
  # A mirror serving well-formed but altered files is rejected by checksum.
  served = tmp_path / "mirror"
  _write_dir(served, _fake(), gz=True)
  monkeypatch.setattr(data_lib, "DEFAULT_DIR", tmp_path / "cache")
  monkeypatch.setattr(data_lib, "MIRRORS", (served.as_uri() + "/",))
  with pytest.raises(data_lib.DataError, match="genuine MNIST"):
    data_lib.load()


@pytest.mark.skipif(not SHARED.is_file(), reason=f"no {SHARED}")
def test_shared_mnist_is_genuine():
  data_lib.verify(data_lib.load(SHARED))


@pytest.fixture(scope="module")
def mnist_path(tmp_path_factory):
  if SHARED.is_file():
    return SHARED
  try:  # the cache, or the mirrors when there is a network
    data_lib.load()
  except data_lib.DataError as e:
    pytest.skip(f"MNIST is not available here: {e}")
  return None


def test_one_epoch_on_2k_examples(mnist_path, tmp_path):
  args = ["--methods", "full,galore,lowrank-lora-init,q_galore,lora",
          "--ranks", "64", "--epochs", "1", "--train-limit", "2000",
          "--batch-size", "16", "--update-proj-gap", "50", "--out",
          str(tmp_path), "--no-progress"]
  if mnist_path is not None:
    args += ["--data", str(mnist_path)]
  assert train_lib.main(args) == 0
  records = {(r["method"], r["rank"]): r for r in map(
      json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
  assert records[("full", None)]["final_accuracy"] > 0.85
  assert records[("galore", 64)]["final_accuracy"] > 0.85
  for r in records.values():
    assert len(r["accuracy"]) == 2  # at init and after the epoch
    assert r["final_accuracy"] > 0.5, r
  full, galore = records[("full", None)], records[("galore", 64)]
  assert galore["trainable_params"] == full["trainable_params"] == 669_706
  assert galore["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 4
  lowrank = records[("lowrank-lora-init", 64)]
  assert lowrank["trainable_params"] == (784 + 512) * 64 + 512 + (
      512 + 512) * 64 + 512 + 512 * 10 + 10
  assert records[("q_galore", 64)]["weight_bytes"] < full["weight_bytes"] / 3
  for name in ("accuracy_default_init.png", "accuracy_lora_init.png",
               "accuracy_all.png", "accuracy_vs_rank.png"):
    if name == "accuracy_default_init.png":
      assert not (tmp_path / name).exists()  # that method did not run
      continue
    png = (tmp_path / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
  table = (tmp_path / "summary.md").read_text()
  assert "| galore | 64 |" in table and "| full | - |" in table


def test_lora_adapts_only_the_layers_the_rank_fits():
  args = train_lib.parser().parse_args([])
  _, train, frozen, _, _ = train_lib.build("lora", 16, args, 0)
  assert set(train["layers"][0]) == {"lora_a", "lora_b"}
  assert set(train["layers"][2]) == {"kernel", "bias"}  # 512 x 10: full
  assert train["layers"][0]["lora_a"].shape == (784, 16)
  assert set(frozen["layers"][0]) == {"kernel", "bias"}  # the random base
  assert train_lib.adapted_layers(10) == [0, 1]
  assert train_lib.adapted_layers(512) == []


def test_cli_errors(capsys, tmp_path):
  for bad, msg in [(["--methods", "full,sgd"], "unknown"),
                   (["--ranks", "4,x"], "expected integers"),
                   (["--ranks", "0"], "ranks must be positive"),
                   (["--epochs", "0"], "--epochs must be >= 1"),
                   (["--lr", "-1"], "--lr must be finite and > 0, got -1.0"),
                   (["--lr", "inf"], "--lr must be finite and > 0"),
                   (["--galore-scale", "nan"], "--galore-scale must be"),
                   (["--seed", "-3"], "--seed must be >= 0"),
                   (["--update-proj-gap", str(2**31)],
                    "--update-proj-gap must be <= 2**30"),
                   (["--train-limit", "10"], "--train-limit must be >=")]:
    with pytest.raises(SystemExit) as e:
      train_lib.main(bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err
  assert train_lib.main(["--data", str(tmp_path / "none.npz")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_deterministic_with_seed(mnist_path, tmp_path):
  def run(out, seed):
    args = ["--methods", "full,q_galore", "--ranks", "16", "--epochs", "1",
            "--train-limit", "512", "--out", str(out), "--no-progress",
            "--seed", str(seed)]
    if mnist_path is not None:
      args += ["--data", str(mnist_path)]
    assert train_lib.main(args) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    return [(r["accuracy"], r["train_loss"]) for r in map(json.loads, lines)]

  first = run(tmp_path / "a", 0)
  assert run(tmp_path / "b", 0) == first
  assert run(tmp_path / "c", 1) != first
