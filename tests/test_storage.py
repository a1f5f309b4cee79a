"""self_flow.storage on local paths: whole-file writes that a failure never half-does. (The same
functions on gs:// run in tests/test_pod_journey.py against a Cloud Storage server.)"""

import os

import numpy as np
import pytest

from self_flow import storage


def test_writes_replace_whole_files_and_a_failed_write_changes_nothing(tmp_path):
  path = str(tmp_path / "deep" / "file.json")
  storage.write_json(path, {"a": 1})
  assert storage.read_json(path) == {"a": 1}
  with pytest.raises(RuntimeError, match="writer died"):
    with storage.local_output(path) as local, open(local, "w", encoding="utf-8") as f:
      f.write('{"a": ')
      raise RuntimeError("writer died")
  assert storage.read_json(path) == {"a": 1}  # the old file, whole
  assert storage.list_names(tmp_path / "deep") == ["file.json"]  # no temporary left behind
  source = tmp_path / "local.bin"
  source.write_bytes(b"\x00" * 1000)
  storage.upload(str(source), path)
  assert storage.read_bytes(path) == b"\x00" * 1000


def test_paths_urls_and_listings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("run") == os.path.join(str(tmp_path), "run")
  assert storage.resolve("gs://b/run") == "gs://b/run"
  assert storage.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert storage.is_url("gs://b") and not storage.is_url("/gs:/b")
  assert storage.list_names(tmp_path / "absent") == []
  storage.save_npz(tmp_path / "x.npz", {"w": np.arange(3)})
  np.testing.assert_array_equal(storage.load_npz(tmp_path / "x.npz")["w"], np.arange(3))
  storage.remove(tmp_path / "x.npz")
  storage.remove(tmp_path / "x.npz")  # absent: nothing to do
  assert not storage.exists(tmp_path / "x.npz")
