"""One line, non-zero, nothing of the user's changed (issue 28, items 4-7): the trainer's own epoch
checkpoint deploys, and every other mistake or fault here is one line naming what is wrong and what to
do: an unreachable s3 store, a full disk at the statistics update, a layer name edited in zarr.json
(``../x`` or another name), ``inspect --plot`` into a missing folder or not a PNG, ``verify --repair``
beside a build's options, a cache deleted under its reader, a plain-pickle checkpoint, ``--kd`` naming a
term twice or nothing, and ``deploy --help``'s default."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featcache.errors import CacheFormatError, CacheNotFoundError, CheckpointError, FeatcacheError
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import PILLAR_CONFIG, REPO, free_port, nus_cfg_options, save_openmmlab_checkpoint

FEATCACHE = [sys.executable, "-m", "featcache.cli"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# -- 4: the trainer's own epoch checkpoint deploys --------------------------------------------------
def test_the_trainers_epoch_checkpoint_loads_its_students_weights(tmp_path):
    from featcache.teacher import models
    from featcache.deploy.export import load_detector

    student = REPO / "configs" / "demo" / "student_half.py"
    torch.manual_seed(3)
    model = models.build_model(models.load_config(str(student)))
    weights = model.state_dict()
    distiller = torch.nn.Module()  # what CacheDistiller saves: student.*, terms.*, steps
    distiller.student = model
    distiller.terms = torch.nn.ModuleDict({"pkd": torch.nn.Linear(3, 2)})
    distiller.register_buffer("steps", torch.tensor(40))
    path = save_openmmlab_checkpoint(distiller, tmp_path / "epoch_4.pth")
    _, loaded = load_detector(str(student), str(path))
    assert loaded.state_dict().keys() == weights.keys()
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in weights.items())


def test_a_plain_pickle_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path):
    from featcache.teacher.checkpoint import load_checkpoint_file

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}))  # what pickle.dump(model_dict, f) writes
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint_file(path)
    message = str(raised.value)
    assert f"checkpoint '{path}' is not a readable PyTorch checkpoint (torch's weights-only unpickler: " in message
    assert "featcache never unpickles with weights_only=False" in message
    assert "will likely succeed" not in message and "\n" not in message


# -- 6: one line instead of a traceback ------------------------------------------------------------------
def _s3_build(nus_one: Path, pillar_ckpt: Path, storage_options: dict, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", "s3://featcache-test/cache",
                                       "--layers", "pts_neck", "--storage-options", json.dumps(storage_options)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_s3_without_credentials_or_with_a_closed_endpoint_is_one_line(nus_one, pillar_ckpt, tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    endpoint = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
    no_credentials = _s3_build(nus_one, pillar_ckpt, endpoint, env)
    assert no_credentials.returncode == 1
    error = _one_error(no_credentials.stderr)
    assert "StoreAccessError: s3://featcache-test/cache: the store cannot be reached (NoCredentialsError" in error
    assert "check its credentials" in error

    closed = _s3_build(nus_one, pillar_ckpt, {**endpoint, "key": "a", "secret": "b"}, env)
    assert closed.returncode == 1
    error = _one_error(closed.stderr)
    assert "the store cannot be reached (EndpointConnectionError" in error and "and its endpoint" in error


def test_a_full_disk_at_the_statistics_update_is_one_error_and_the_cache_verifies(nus_one, pillar_ckpt, tmp_path,
                                                                                    monkeypatch):
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.writer import CacheWriter

    def full(self, **info):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheWriter, "set_progress", full)
    out = tmp_path / "cache"
    with pytest.raises(FeatcacheError, match=r"every sample this run computed is written and recorded, but the "
                                             r"build's summary .* No space left on device\. The cache is usable"):
        build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck",
                                 cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    assert verify_cache(str(out)).ok


def test_the_progress_bar_ends_at_what_was_written_when_a_write_fails(nus_six, pillar_ckpt, tmp_path, monkeypatch,
                                                                       capsys):
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.writer import CacheWriter

    write_sample, calls = CacheWriter.write_sample, []

    def second_write_fails(self, row, *args, **kwargs):
        calls.append(row)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_sample(self, row, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_sample", second_write_fails)
    with pytest.raises(FeatcacheError, match="No space left on device"):
        build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(tmp_path / "cache"), layers="pts_neck",
                                 cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=True))
    final = capsys.readouterr().err.replace("\n", "\r").split("\r")
    final = [line for line in final if "featcache build" in line][-1]
    assert "(stopped)" in final and " 1/6 " in final, final


def _rename_layer(zarr_json: Path, old: str, new: str) -> None:
    metadata = json.loads(zarr_json.read_text())
    for layer in metadata["attributes"]["featcache"]["layers"]:
        if layer["name"] == old:
            layer["name"] = new
    zarr_json.write_text(json.dumps(metadata))


@pytest.mark.parametrize("name", ["../pts_neck.0", "pts_neck.9"], ids=["dot-dot", "another-name"])
def test_a_layer_name_edited_in_zarr_json_is_named_as_the_manifests_problem(reference_cache, nus_six, pillar_ckpt,
                                                                           tmp_path, name):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    _rename_layer(out / "zarr.json", "pts_neck.0", name)
    before = _tree_digest(out)
    problem = f"{out}: the manifest names array 'features/{name}', which the cache cannot open"
    commands = {"verify": ["verify", str(out)], "export": ["export", str(out), "--format", "hdf5",
                                                           str(tmp_path / "x.h5")]}
    for command, args in commands.items():
        result = subprocess.run(FEATCACHE + args, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1, (command, result.stderr[-3000:])
        error = _one_error(result.stderr)
        assert f"CacheFormatError: {problem}" in error and "zarr.json was edited or damaged" in error, command
        assert "verify --repair" not in error, command
    with pytest.raises(CacheFormatError, match="the manifest names array"):
        open_cache(out).read_row(0)
    build = subprocess.run(FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", str(out), "--layers",
                                        "pts_middle_encoder,pts_neck", "--num-workers", "0",
                                        *[arg for key, value in nus_cfg_options(nus_six).items()
                                          for arg in ("--cfg-options", f"{key}={value}")]],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 1
    assert problem in _one_error(build.stderr)
    assert _tree_digest(out) == before
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("plot, problem", [("missing/bev.png", "folder {folder} does not exist"),
                                           ("bev.txt", "the plot is a PNG; give a name ending with .png")],
                         ids=["missing-folder", "txt"])
def test_inspect_plot_into_a_missing_folder_or_not_a_png_is_one_line(reference_cache, tmp_path, plot, problem):
    before = _tree_digest(tmp_path)
    result = subprocess.run(FEATCACHE + ["inspect", reference_cache, "--plot", str(tmp_path / plot)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    error = _one_error(result.stderr)
    assert "Invalid value for --plot:" in error and problem.format(folder=tmp_path / "missing") in error
    assert _tree_digest(tmp_path) == before and not (tmp_path / "missing").exists()


# -- 7: messages that misled ---------------------------------------------------------------------------
def test_reading_a_cache_deleted_under_the_reader_says_so(reference_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    cache = open_cache(out)
    first, second = cache.row_keys[:2]
    cache[first]
    shutil.rmtree(out)
    with pytest.raises(CacheNotFoundError, match=f"cache {out} no longer exists: it was deleted"):
        cache[second]


def test_an_empty_info_list_is_named(nus_one, pillar_ckpt, tmp_path):
    data = tmp_path / "empty"
    shutil.copytree(nus_one, data)
    infos = pickle.loads((data / "infos.pkl").read_bytes())
    (data / "infos.pkl").write_bytes(pickle.dumps({**infos, "data_list": []}))
    out = tmp_path / "cache"
    result = subprocess.run(FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", str(out), "--layers",
                                         "pts_neck", *[arg for key, value in nus_cfg_options(data).items()
                                                       for arg in ("--cfg-options", f"{key}={value}")]],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    error = _one_error(result.stderr)
    assert f"its info file {data}/infos.pkl lists no samples (an empty data_list)" in error, error
    assert "need at least one array" not in error
    assert not out.exists()


@pytest.mark.parametrize("kd, problem", [("infonce=1,infonce=2", "names 'infonce' more than once"),
                                         ("", "names no term")], ids=["twice", "empty"])
def test_kd_naming_a_term_twice_or_nothing_is_refused(tmp_path, kd, problem):
    from trainer.cli import main

    result = CliRunner().invoke(main, ["train", "configs/demo/student_half.py", "--work-dir", str(tmp_path / "w"),
                                       "--kd", kd])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --kd:" in result.output and problem in result.output
    assert not (tmp_path / "w").exists()


def test_deploy_help_shows_the_calibration_default():
    from featcache.cli import main
    from featcache.deploy.quantize import CALIBRATION_SCANS

    result = CliRunner().invoke(main, ["deploy", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"[default: {CALIBRATION_SCANS}]" in " ".join(result.output.split())
    assert "featcache.deploy.quantize" not in result.output


def test_pairs_with_an_unknown_name_says_which_side_lacks_it(reference_cache, nus_six):
    from featcache.errors import ConfigError
    from trainer.train import TrainOptions, build_runner_config

    options = {"train_dataloader.dataset.data_root": f"{nus_six}/", "train_dataloader.dataset.ann_file": "infos.pkl",
               "train_dataloader.num_workers": 0, "train_dataloader.persistent_workers": False}
    noaug = str(REPO / "tests" / "configs" / "pillar_half_noaug.py")
    with pytest.raises(ConfigError) as raised:
        build_runner_config(TrainOptions(noaug, reference_cache, pairs={"pts_nek.0": "pts_neck.0"}, cfg_options=options))
    message = str(raised.value)
    assert message.startswith("--pairs pts_nek.0=pts_neck.0: the student has no layer 'pts_nek.0' (its layers: ")
    assert "the cache has no layer" not in message
