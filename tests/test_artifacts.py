"""Outputs appear whole or not at all, and a failed write never costs the user what was there."""

import os
from pathlib import Path

import pytest

from wanda_serve.artifacts import atomic_files, atomic_output_dir, read_json_file, replacing_dir, write_file_atomically
from wanda_serve.errors import WandaServeError


def listing(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else p.read_text() for p in sorted(root.rglob("*"))}


@pytest.fixture
def old_run(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous run")
    return out


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_a_failed_block_leaves_the_old_output_and_no_temporary(old_run, failure):
    before = listing(old_run.parent)
    with pytest.raises(type(failure)):
        with atomic_output_dir(old_run, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise failure
    assert listing(old_run.parent) == before


def test_a_failed_final_rename_puts_the_old_output_back(old_run, monkeypatch):
    before = listing(old_run.parent)
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(WandaServeError, match="No space left on device"):
        with atomic_output_dir(old_run, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("complete")
    assert listing(old_run.parent) == before


def test_overwrite_replaces_only_when_complete(old_run):
    with atomic_output_dir(old_run, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("complete")
        assert (old_run / "keep.txt").exists()  # still there while the new output is built
    assert listing(old_run.parent) == {"out": "dir", "out/new.txt": "complete"}


def test_parents_made_for_a_failed_output_are_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("boom")
    assert listing(tmp_path) == {}


def test_unwritable_place_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WandaServeError, match=f"cannot write output {tmp_path}/file/sub"):
        with atomic_output_dir(tmp_path / "file" / "sub"):
            pass
    assert listing(tmp_path) == {"file": "x"}


def test_the_current_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (Path("."), Path(".."), tmp_path):
        with pytest.raises(WandaServeError, match="current directory"):
            with atomic_output_dir(out, overwrite=True):
                pass


def test_file_written_atomically_only_with_overwrite(tmp_path):
    path = tmp_path / "result.json"
    write_file_atomically(path, "one")
    with pytest.raises(WandaServeError, match="--json .* exists"):
        write_file_atomically(path, "two", option="--json")
    write_file_atomically(path, "two", overwrite=True)
    with pytest.raises(WandaServeError, match="is a directory"):
        write_file_atomically(tmp_path, "x", overwrite=True)
    assert listing(tmp_path) == {"result.json": "two"}


def test_files_written_together_or_not_at_all(tmp_path):
    model, manifest = tmp_path / "new" / "model.gguf", tmp_path / "new" / "model.gguf.manifest.json"
    with pytest.raises(RuntimeError):
        with atomic_files([(model, "--out"), (manifest, "manifest")]) as (model_tmp, manifest_tmp):
            assert model_tmp.name.endswith(".partial.gguf")  # readers that go by the suffix still know it
            model_tmp.write_text("weights")
            manifest_tmp.write_text("{}")
            raise RuntimeError("check failed")
    assert listing(tmp_path) == {}  # the directory made for them is gone too
    with atomic_files([(model, "--out"), (manifest, "manifest")]) as (model_tmp, manifest_tmp):
        model_tmp.write_text("weights")
        manifest_tmp.write_text("{}")
    assert listing(tmp_path) == {"new": "dir", "new/model.gguf": "weights", "new/model.gguf.manifest.json": "{}"}
    umask = os.umask(0)
    os.umask(umask)
    assert model.stat().st_mode & 0o777 == 0o666 & ~umask  # not left private (0600) like a temporary
    with pytest.raises(WandaServeError, match="manifest .*manifest.json exists"):
        with atomic_files([(tmp_path / "other.gguf", "--out"), (manifest, "manifest")]):
            pass
    assert not (tmp_path / "other.gguf").exists()


def test_damaged_json_is_one_clear_error(tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(WandaServeError, match="cannot read .*report.json"):
        read_json_file(tmp_path / "report.json")
    (tmp_path / "report.json").write_text("[1]")
    with pytest.raises(WandaServeError, match="expected a JSON object"):
        read_json_file(tmp_path / "report.json")


def test_a_failed_long_job_restores_the_old_run(old_run):
    before = listing(old_run.parent)
    with pytest.raises(KeyboardInterrupt):
        with replacing_dir(old_run, overwrite=True):
            with atomic_output_dir(old_run / "stage1") as tmp:
                (tmp / "done.txt").write_text("finished stage")
            assert listing(old_run) == {"stage1": "dir", "stage1/done.txt": "finished stage"}  # built in place
            raise KeyboardInterrupt
    assert listing(old_run.parent) == before


def test_a_failed_long_job_in_a_new_place_keeps_its_finished_stages(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with replacing_dir(out):
            with atomic_output_dir(out / "stage1") as tmp:
                (tmp / "done.txt").write_text("finished stage")
            raise RuntimeError("stage 2 failed")
    assert listing(tmp_path) == {"run": "dir", "run/stage1": "dir", "run/stage1/done.txt": "finished stage"}
