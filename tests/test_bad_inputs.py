"""Bad inputs to every command: one line `error: ...`, exit code 2, no traceback, nothing on disk changed.

Each case runs the CLI in-process (`main([...])`) through `refused`, which snapshots the
folders involved (relative path -> size and sha256; folders too) before and after, so a
failed command that writes, deletes or creates anything (a run folder, a half beton)
fails the test. Every test runs in its own working directory with `$FASTCIFAR_DATA`
inside it, so the default paths (`./data`, `runs/`) are watched as well. Nothing here
trains a model: each command must fail before the first batch.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fastcifar_cli import main

REPO = Path(__file__).resolve().parents[1]
# Warning categories Python does not print by default: the others reach a real run's stderr.
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


# ---------------------------------------------------------------- the shared check


@pytest.fixture(autouse=True)
def sandbox(tmp_path, monkeypatch) -> Path:
    """The test's own working directory and data root: default outputs land where they are watched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTCIFAR_DATA", str(tmp_path / "data"))
    return tmp_path


def snapshot(folder: Path) -> dict:
    """relative path -> (size, sha256) for files, "dir" for folders, "link" for links; {} if absent."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    state = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            state[rel] = "link"
        elif p.is_dir():
            state[rel] = "dir"
        else:
            data = p.read_bytes()
            state[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return state


def refused(capsys, args, *needles: str, watch=()) -> str:
    """Runs `fastcifar ARGS` and checks the error contract; returns the error line.

    Watches the working directory (which holds the test's files) and every folder in `watch`.
    """
    folders = [Path.cwd(), *map(Path, watch)]
    before = [snapshot(f) for f in folders]
    capsys.readouterr()  # drop what the test's own setup printed
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exc:
        warnings.simplefilter("always")
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN)]
    assert not shown, f"a real run would print these to stderr too: {shown}"
    assert "Traceback" not in out and "Traceback" not in err, err
    assert exc.value.code == 2, f"exit {exc.value.code}: {err}"
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    for folder, old in zip(folders, before):
        assert snapshot(folder) == old, f"{folder} changed"
    return err.rstrip("\n")


# ---------------------------------------------------------------- inputs made here


def tiny(betons, **over) -> dict:
    """A small valid experiment on `betons` (section__key=value overrides), as in test_train."""
    raw = {
        "name": "tiny",
        "model": {"name": "fastnet"},
        "data": {"beton_dir": str(betons), "batch_size": 100, "workers": 2, "augment": ["flip"]},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "none"},
        "train": {"epochs": 1, "precision": "bf16", "device": "cpu", "seed": 1},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_betons(betons: Path, dest: Path) -> Path:
    """A private copy of a shared beton folder, to damage."""
    return Path(shutil.copytree(betons, dest))


def fake_run(folder: Path, betons: Path, last: bytes | None = None, best: bytes | None = None) -> Path:
    """A run folder as train leaves it (config.yaml, metrics.jsonl), with the given checkpoint bytes."""
    from train.config import build_config

    folder.mkdir(parents=True)
    write_yaml(folder / "config.yaml", build_config(tiny(betons)).to_dict())
    (folder / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 50.0}\n')
    for name, data in (("checkpoint_last.pt", last), ("checkpoint_best.pt", best)):
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


class RunsCode:
    """A pickle payload that would create `marker` when unpickled (os.system via __reduce__)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(folder: Path, per_batch: int = 4) -> Path:
    """A tiny cifar-10-batches-py folder (Python-2 style bytes keys)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        _dump(folder / name, {b"labels": rng.integers(0, 10, per_batch).tolist(), b"data": data})
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return folder


def tarball_with(target: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    member.size = len(data) if member.isfile() else 0
    with tarfile.open(target, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return target


# ---------------------------------------------------------------- paths


def test_paths(tmp_path, capsys):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    refused(capsys, ["beton", "write", "--source", missing, "--out", tmp_path / "out"], "source not found", "missing")
    refused(capsys, ["beton", "write", "--source", a_file, "--out", tmp_path / "out"], "a_file.txt",
            "not a CIFAR folder")
    refused(capsys, ["beton", "inspect", missing], "no beton folder at", "missing")
    refused(capsys, ["beton", "inspect", a_file], "no beton folder at", "a_file.txt")
    refused(capsys, ["beton", "inspect", empty], "no manifest.json in", "empty")
    refused(capsys, ["train", missing / "c.yaml"], "config not found", "c.yaml")
    refused(capsys, ["train", empty], "config not found", "empty")  # a folder where a file is expected
    refused(capsys, ["sweep", missing], "no such config file or folder", "missing")
    refused(capsys, ["sweep", empty], "no *.yaml configs in", "empty")
    refused(capsys, ["lr-find", missing / "c.yaml"], "config not found", "c.yaml")
    refused(capsys, ["bench", "train", "--config", missing / "c.yaml"], "config not found", "c.yaml")
    refused(capsys, ["bench", "loader", "--beton", missing], "no beton folder at", "missing")
    refused(capsys, ["analyze", missing], "run folder not found", "missing")
    refused(capsys, ["analyze", a_file], "run folder not found", "a_file.txt")


def test_paths_inside_a_config(beton_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    config = write_yaml(tmp_path / "tiny.yaml", tiny(beton_dir))
    refused(capsys, ["train", config, "--set", f"data.beton_dir={a_file}"], "no beton folder at", "a_file.txt")
    refused(capsys, ["train", config, "--out", a_file / "run"], "cannot create run folder", "a_file.txt",
            watch=[beton_dir])


def test_beton_write_into_a_file_where_a_folder_is_expected(tmp_path, capsys):
    source = make_cifar10(tmp_path / "cifar-10-batches-py")
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a folder\n")
    refused(capsys, ["beton", "write", "--source", source, "--out", blocker], "cannot create", "out")
    refused(capsys, ["beton", "write", "--source", source, "--out", blocker / "cifar10"], "cannot create")


def test_beton_write_refuses_existing_betons_without_force(beton_dir, tmp_path, capsys):
    source = make_cifar10(tmp_path / "cifar-10-batches-py")
    out = copy_betons(beton_dir, tmp_path / "betons")
    refused(capsys, ["beton", "write", "--source", source, "--out", out], "pass --force", "train.beton")


# ---------------------------------------------------------------- configs


def text(yaml_text: str):
    return lambda betons: yaml_text


def with_(**over):
    """The tiny config with `section__key=value` changes, as YAML."""
    return lambda betons: yaml.safe_dump(tiny(betons, **over))


BAD_CONFIGS = {  # id -> (beton folder -> YAML text of the config; what the error names)
    "yaml_syntax": (text("name: x\nmodel: {name: fastnet\ntrain: [1, 2\n"), "invalid YAML"),
    "yaml_tab": (text("model:\n\tname: fastnet\n"), "invalid YAML"),
    "not_a_mapping": (text("- resnet18\n- resnet34\n"), "expected a mapping of sections"),
    "nested_too_deeply": (text("description: " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    "not_utf8": (text("name: caf\xe9\n"), "cannot read config"),  # the test writes latin-1
    "unknown_section": (lambda b: yaml.safe_dump({**tiny(b), "trian": {"epochs": 3}}), "unknown key(s) trian"),
    "unknown_key": (with_(optimizer__learning_rate=0.1), "learning_rate"),
    "bad_type_number": (with_(optimizer__lr="fast"), "optimizer.lr: expected a number"),
    "bad_type_int": (with_(train__checkpoint_every=2.5), "train.checkpoint_every: expected an integer"),
    "bad_type_epochs": (with_(train__epochs="eight"), "train.epochs: expected int or float"),
    "bad_type_section": (lambda b: yaml.safe_dump({**tiny(b), "model": "resnet18"}), "model: expected a mapping"),
    "negative_lr": (with_(optimizer__lr=-0.1), "optimizer.lr must be positive"),
    "zero_batch": (with_(data__batch_size=0), "data.batch_size must be at least 1"),
    "zero_epochs": (with_(train__epochs=0), "train.epochs must be positive"),
    "cutout_too_big": (with_(data__augment=[{"cutout": {"size": 99}}]), "Cutout.size"),
    "bad_probability": (with_(data__augment=[{"flip": {"p": 2}}]), "p must be a probability"),
    "unknown_model": (with_(model__name="resnet99"), "unknown model 'resnet99'"),
    "unknown_norm": (with_(model__norm="weird"), "model.norm"),
    "unknown_optimizer": (with_(optimizer__name="lion"), "optimizer.name"),
    "unknown_scheduler": (with_(scheduler__name="warmup"), "scheduler.name"),
    "unknown_augmentation": (with_(data__augment=[{"blur": {"radius": 2}}]), "unknown augmentation 'blur'"),
    "unknown_aug_param": (with_(data__augment=[{"rotate": {"degrees": 5}}]), "degrees"),
    "unknown_device": (with_(train__device="tpu"), "train.device"),
    "missing_beton_dir": (with_(data__beton_dir="/nonexistent/betons"), "/nonexistent/betons"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_for_train(case, beton_dir, tmp_path, capsys):
    make, needle = BAD_CONFIGS[case]
    config = tmp_path / "bad.yaml"
    config.write_text(make(beton_dir), encoding="latin-1")
    refused(capsys, ["train", config, "--out", tmp_path / "run"], needle, watch=[beton_dir])


def test_huge_bad_value_gives_a_short_error_line(beton_dir, tmp_path, capsys):
    """A YAML alias bomb (9**7 leaves, a few lines of text) in a string key: the error shows a bounded repr."""
    levels = ["    - &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7)]
    config = tmp_path / "bomb.yaml"
    config.write_text("description:\n" + "\n".join(levels) + "\n")
    line = refused(capsys, ["train", config, "--out", tmp_path / "run"], "description: expected str")
    assert len(line) < 300, len(line)
    config.write_text(yaml.safe_dump(tiny(beton_dir, model__name=list(range(5000)))))
    line = refused(capsys, ["train", config], "model.name: expected str")
    assert len(line) < 300, len(line)


@pytest.mark.parametrize("command", [
    ["sweep", "{config}", "--out", "{tmp}/runs"],
    ["lr-find", "{config}", "--iters", "5", "--out", "{tmp}/lr"],
    ["bench", "train", "--config", "{config}", "--steps", "1"],
], ids=["sweep", "lr-find", "bench-train"])
@pytest.mark.parametrize("case", ["yaml_syntax", "unknown_key", "unknown_model", "unknown_scheduler"])
def test_bad_config_for_the_other_commands(command, case, beton_dir, tmp_path, capsys):
    make, needle = BAD_CONFIGS[case]
    config = tmp_path / "bad.yaml"
    config.write_text(make(beton_dir))
    args = [a.format(config=config, tmp=tmp_path) for a in command]
    refused(capsys, args, needle, watch=[beton_dir])


@pytest.mark.parametrize("command", [["train", "{config}"], ["sweep", "{config}"], ["lr-find", "{config}"],
                                     ["bench", "train", "--config", "{config}"]],
                         ids=["train", "sweep", "lr-find", "bench-train"])
def test_python_yaml_tag_is_refused_and_runs_nothing(command, tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    refused(capsys, [a.format(config=config) for a in command], "invalid YAML", "evil.yaml")
    assert not marker.exists()


def test_sweep_refuses_configs_sharing_a_name_before_training(beton_dir, tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    write_yaml(folder / "a.yaml", tiny(beton_dir))
    write_yaml(folder / "b.yaml", tiny(beton_dir))  # both named "tiny"
    refused(capsys, ["sweep", folder, "--out", tmp_path / "runs"], "configs share a name (tiny)", watch=[beton_dir])


def test_sweep_refuses_a_run_of_another_config(beton_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "tiny.yaml", tiny(beton_dir, optimizer__lr=0.2))
    run = fake_run(tmp_path / "runs" / "tiny", beton_dir, last=b"x")
    (run / "summary.json").write_text('{"complete": false}\n')
    refused(capsys, ["sweep", config, "--out", tmp_path / "runs"], "holds a run of a different config",
            watch=[beton_dir])


# ---------------------------------------------------------------- betons


def _truncate(folder: Path) -> None:
    path = folder / "train.beton"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(folder: Path) -> None:
    path = folder / "test.beton"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def _no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


def _manifest_not_json(folder: Path) -> None:
    (folder / "manifest.json").write_text("{'dataset': cifar10,\n")


def _manifest_missing_key(folder: Path) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["mean"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _beton_missing(folder: Path) -> None:
    (folder / "test.beton").unlink()


def _edit_manifest(change):
    def damage(folder: Path) -> None:
        import json

        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return damage


BAD_BETONS = {  # id -> (damage, needle for `beton inspect`, needle for the commands that load)
    "truncated": (_truncate, "sha256 mismatch for train.beton", "truncated"),
    "corrupted_bytes": (_flip_bytes, "sha256 mismatch for test.beton", None),  # same size: only sha256 sees it
    "no_manifest": (_no_manifest, "incomplete", "incomplete"),
    "manifest_not_json": (_manifest_not_json, "invalid JSON", "invalid JSON"),
    "manifest_missing_key": (_manifest_missing_key, "missing key 'mean'", "missing key 'mean'"),
    "beton_missing": (_beton_missing, "missing test.beton", "test.beton"),
    "manifest_count_not_int": (_edit_manifest(lambda m: m["splits"]["train"].update(count="many")),
                               "'splits.train.count' is not a non-negative integer", "splits.train.count"),
    "manifest_per_class_not_int": (_edit_manifest(lambda m: m["splits"]["test"].update(per_class=["x"] * 10)),
                                   "'splits.test.per_class' is not a list", "splits.test.per_class"),
    "manifest_sha256_not_str": (_edit_manifest(lambda m: m["splits"]["train"].update(sha256=5)),
                                "'splits.train.sha256' is not a non-empty string", "splits.train.sha256"),
    "manifest_file_not_str": (_edit_manifest(lambda m: m["splits"]["test"].update(file=None)),
                              "'splits.test.file' is not a non-empty string", "splits.test.file"),
    "manifest_no_classes": (_edit_manifest(lambda m: [m.update(classes=[])] + [m["splits"][s].update(per_class=[])
                                                                             for s in ("train", "test")]),
                            "'classes' is empty", "'classes' is empty"),
}


@pytest.mark.parametrize("case", list(BAD_BETONS))
def test_damaged_beton_folder(case, beton_dir, tmp_path, capsys):
    damage, inspect_needle, load_needle = BAD_BETONS[case]
    betons = copy_betons(beton_dir, tmp_path / "betons")
    damage(betons)
    refused(capsys, ["beton", "inspect", betons], inspect_needle)
    refused(capsys, ["beton", "inspect", betons, "--json"], inspect_needle)
    if load_needle is None:
        return
    config = write_yaml(tmp_path / "tiny.yaml", tiny(betons))
    refused(capsys, ["train", config, "--out", tmp_path / "run"], load_needle)
    refused(capsys, ["bench", "loader", "--beton", betons, "--batches", "1", "--no-baselines"], load_needle)


def test_bench_loader_on_a_beton_smaller_than_one_batch(tmp_path, capsys):
    from beton.sources import Source, Split
    from beton.writer import write_betons

    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 40).astype(np.int64))
    betons = tmp_path / "small"
    write_betons(Source("cifar10", [f"c{i}" for i in range(10)], {"train": split, "test": split}, "tiny"), betons)
    refused(capsys, ["bench", "loader", "--beton", betons, "--batches", "1"], "only 40 training images")


# ---------------------------------------------------------------- source data for `beton write`


def _escaping_member(tmp: Path):
    return tarball_with(tmp / "evil.tar.gz", tarfile.TarInfo("../evil"), b"evil"), "'../evil'"


def _nested_escape(tmp: Path):
    member = tarfile.TarInfo("cifar-10-batches-py/../../evil")
    return tarball_with(tmp / "evil.tar.gz", member, b"evil"), "path escapes"


def _absolute_member(tmp: Path):
    return tarball_with(tmp / "abs.tar.gz", tarfile.TarInfo(f"{tmp}/evil"), b"evil"), "absolute path"


def _symlink_member(tmp: Path):
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return tarball_with(tmp / "link.tar.gz", member), "(link)"


def _hardlink_member(tmp: Path):
    member = tarfile.TarInfo("cifar-10-batches-py/test_batch")
    member.type, member.linkname = tarfile.LNKTYPE, "/etc/shadow"
    return tarball_with(tmp / "hard.tar.gz", member), "(link)"


def _device_member(tmp: Path):
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
    return tarball_with(tmp / "dev.tar.gz", member), "device or special file"


def _fifo_member(tmp: Path):
    member = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
    member.type = tarfile.FIFOTYPE
    return tarball_with(tmp / "fifo.tar.gz", member), "device or special file"


def _not_a_tarball(tmp: Path):
    path = tmp / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    return path, "not a CIFAR folder or .tar.gz"


def _truncated_tarball(tmp: Path):
    src = make_cifar10(tmp / "src" / "cifar-10-batches-py")
    path = tmp / "cut.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    path.write_bytes(path.read_bytes()[:600])
    return path, "cut.tar.gz"


def _code_running_pickle(tmp: Path):
    src = make_cifar10(tmp / "cifar-10-batches-py")
    (src / "data_batch_3").write_bytes(pickle.dumps(RunsCode(tmp / "pwned"), protocol=2))
    return src, "data_batch_3"


def _code_running_pickle_in_tarball(tmp: Path):
    src = make_cifar10(tmp / "src" / "cifar-10-batches-py")
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": RunsCode(tmp / "pwned")}, protocol=2))
    path = tmp / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    shutil.rmtree(tmp / "src")
    return path, "batches.meta"


def _garbage_pickle(tmp: Path):
    src = make_cifar10(tmp / "cifar-10-batches-py")
    (src / "test_batch").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00dataq")
    return src, "test_batch: truncated or corrupt pickle"


def _missing_batch(tmp: Path):
    src = make_cifar10(tmp / "cifar-10-batches-py")
    (src / "data_batch_4").unlink()
    return src, "missing data_batch_4"


def _label_out_of_range(tmp: Path):
    src = make_cifar10(tmp / "cifar-10-batches-py")
    _dump(src / "data_batch_2", {b"labels": [0, 1, 12, 3], b"data": np.zeros((4, 3072), np.uint8)})
    return src, "label 12 at position 2 is out of range"


BAD_SOURCES = [_escaping_member, _nested_escape, _absolute_member, _symlink_member, _hardlink_member,
               _device_member, _fifo_member, _not_a_tarball, _truncated_tarball, _code_running_pickle,
               _code_running_pickle_in_tarball, _garbage_pickle, _missing_batch, _label_out_of_range]


@pytest.mark.parametrize("make", BAD_SOURCES, ids=lambda f: f.__name__.strip("_"))
def test_bad_source_for_beton_write(make, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"  # the escape target of "../evil" from here is tmp_path/evil: watched too
    work.mkdir()
    monkeypatch.chdir(work)
    path, needle = make(work)
    refused(capsys, ["beton", "write", "--source", path, "--out", work / "out"], needle, watch=[tmp_path])
    refused(capsys, ["beton", "write", "--source", path], needle, watch=[tmp_path])  # default out: ./data/cifar10
    assert not (tmp_path / "evil").exists() and not (work / "pwned").exists()
    assert not any(tmp_path.rglob("evil")) and not (work / "data").exists()


# ---------------------------------------------------------------- checkpoints and run folders


def _malicious_zip_checkpoint(tmp: Path) -> bytes:
    """A real torch.save file whose pickle calls os.system when loaded without weights_only."""
    return torch_bytes({"format": 1, "epoch": 1, "model": {}, "payload": RunsCode(tmp / "pwned")})


def _malicious_raw_pickle(tmp: Path) -> bytes:
    return pickle.dumps(RunsCode(tmp / "pwned"))


def _truncated_checkpoint(tmp: Path) -> bytes:
    data = torch_bytes({"format": 1, "epoch": 1, "model": {"w": torch.zeros(1000)}})
    return data[: len(data) // 2]


def _garbage_checkpoint(tmp: Path) -> bytes:
    return b"this is not a checkpoint\n" * 10


def _empty_checkpoint(tmp: Path) -> bytes:
    return b""


def _foreign_checkpoint(tmp: Path) -> bytes:
    return torch_bytes({"state_dict": {"w": torch.zeros(3)}})  # plain data, but not fastcifar's


BAD_CHECKPOINTS = {
    "malicious_zip": (_malicious_zip_checkpoint, "refusing to load it"),
    # torch's safe loader cannot even parse a raw protocol-4 pickle: refused before it reads the GLOBAL
    "malicious_pickle": (_malicious_raw_pickle, "not a readable checkpoint"),
    "truncated": (_truncated_checkpoint, "not a readable checkpoint"),
    "garbage": (_garbage_checkpoint, "not a readable checkpoint"),
    "wrong_model": (lambda tmp: torch_bytes({"format": 1, "epoch": 1, "model": {"w": torch.zeros(2)}}), "does not fit"),
    "no_model": (lambda tmp: torch_bytes({"format": 1, "epoch": 1}), "checkpoint_"),
    "empty": (_empty_checkpoint, "not a readable checkpoint"),
    "foreign": (_foreign_checkpoint, "is not a fastcifar checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_for_analyze(case, beton_dir, tmp_path, capsys):
    make, needle = BAD_CHECKPOINTS[case]
    data = make(tmp_path)
    run = fake_run(tmp_path / "run", beton_dir, last=data, best=data)
    refused(capsys, ["analyze", run], "checkpoint_best.pt", needle, watch=[beton_dir])
    refused(capsys, ["analyze", run, "--checkpoint", "last", "--n", "2"], "checkpoint_last.pt", needle,
            watch=[beton_dir])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_for_resume(case, beton_dir, tmp_path, capsys):
    make, needle = BAD_CHECKPOINTS[case]
    run = fake_run(tmp_path / "run", beton_dir, last=make(tmp_path))
    refused(capsys, ["train", "--resume", run, "--no-analyze"], "checkpoint_last.pt", needle, watch=[beton_dir])
    assert not (tmp_path / "pwned").exists()


def test_run_folders(beton_dir, tmp_path, capsys):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello\n")
    refused(capsys, ["analyze", not_a_run], "not a run folder", "config.yaml")
    untrained = fake_run(tmp_path / "untrained", beton_dir)
    refused(capsys, ["analyze", untrained], "has no checkpoint", "checkpoint_best.pt", watch=[beton_dir])
    refused(capsys, ["train", "--resume", not_a_run], "not_a_run", "not a run folder")
    refused(capsys, ["train", "--resume", tmp_path / "missing"], "missing", "not a run folder")
    bad_config = fake_run(tmp_path / "bad_config", beton_dir, last=b"x", best=b"x")
    (bad_config / "config.yaml").write_text("model: {name: [\n")
    refused(capsys, ["analyze", bad_config], "config.yaml", "invalid YAML")
    refused(capsys, ["train", "--resume", bad_config], "config.yaml", "invalid YAML")
    (bad_config / "config.yaml").write_text("[" * 5000)  # PyYAML's loader would recurse 5000 deep
    refused(capsys, ["analyze", bad_config], "config.yaml", "nested too deeply")
    refused(capsys, ["train", "--resume", bad_config], "config.yaml", "nested too deeply")


def test_sweep_over_a_run_whose_summary_is_not_an_object(beton_dir, tmp_path, capsys):
    # a damaged summary counts as none, so the sweep resumes from the checkpoint: here unreadable
    config = write_yaml(tmp_path / "tiny.yaml", tiny(beton_dir))
    run = fake_run(tmp_path / "runs" / "tiny", beton_dir, last=b"x")  # unreadable: nothing could train
    (run / "summary.json").write_text("[]\n")
    refused(capsys, ["sweep", config, "--out", tmp_path / "runs", "--no-analyze"], "checkpoint_last.pt",
            "not a readable checkpoint", watch=[beton_dir])


def test_train_into_a_folder_that_holds_a_run(beton_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "tiny.yaml", tiny(beton_dir))
    run = fake_run(tmp_path / "run", beton_dir, last=torch_bytes({"format": 1}))
    refused(capsys, ["train", config, "--out", run, "--no-analyze"], "already holds a run", "--resume",
            watch=[beton_dir])
    (tmp_path / "runs").mkdir()
    shutil.copytree(run, tmp_path / "runs" / "tiny")  # the default folder, runs/<name>
    refused(capsys, ["train", config, "--no-analyze"], "already holds a run", watch=[beton_dir])


# ---------------------------------------------------------------- CLI values


CLI_VALUES = {  # id -> (arguments after the command; {config}, {run} filled in; what the error names)
    "negative_epochs": (["train", "{config}", "--epochs", "-1"], "--epochs"),
    "zero_epochs": (["train", "{config}", "--epochs", "0"], "--epochs"),
    "non_integer_subset": (["train", "{config}", "--subset", "half"], "--subset"),
    "float_subset": (["train", "{config}", "--subset", "2.5"], "--subset"),
    "unknown_option": (["train", "{config}", "--learning-rate", "0.1"], "--learning-rate"),
    "set_without_value": (["train", "{config}", "--set", "foo"], "--set expects key=value, got 'foo'"),
    "set_without_key": (["train", "{config}", "--set", "=3"], "--set expects key=value"),
    "set_unknown_key": (["train", "{config}", "--set", "optimizer.learning_rate=0.1"], "learning_rate"),
    "set_bad_type": (["train", "{config}", "--set", "train.epochs=many"], "train.epochs"),
    "set_into_a_value": (["train", "{config}", "--set", "model.name.depth=3"], "is not a section"),
    "set_nested_too_deeply": (["train", "{config}", "--set", "description=" + "[" * 5000], "nested too deeply"),
    "set_for_sweep": (["sweep", "{config}", "--set", "foo"], "--set expects key=value"),
    "resume_with_config": (["train", "{config}", "--resume", "{run}"], "--resume continues a run"),
    "resume_with_epochs": (["train", "--resume", "{run}", "--epochs", "3"], "--resume continues a run"),
    "resume_with_set": (["train", "--resume", "{run}", "--set", "optimizer.lr=0.1"],
                        "--set may change only how it runs"),
    "train_without_config": (["train"], "give a CONFIG"),
    "sweep_negative_subset": (["sweep", "{config}", "--subset", "-5"], "--subset"),
    "lr_find_bad_range": (["lr-find", "{config}", "--start", "1", "--end", "0.1"], "0 < start < end"),
    "lr_find_one_iter": (["lr-find", "{config}", "--iters", "1"], "--iters must be at least 2"),
    "lr_find_not_a_number": (["lr-find", "{config}", "--start", "tiny"], "--start"),
    "lr_find_out_is_a_file": (["lr-find", "{config}", "--out", "{config}/lr"], "is a file, not a folder"),
    "analyze_which_checkpoint": (["analyze", "{run}", "--checkpoint", "middle"], "--checkpoint must be one of"),
    "analyze_zero_n": (["analyze", "{run}", "--n", "0"], "--n must be at least 1"),
    "analyze_method": (["analyze", "{run}", "--method", "magic"], "unknown Grad-CAM method 'magic'"),
    "analyze_pick": (["analyze", "{run}", "--pick", "worst"], "--pick must be one of"),
    "analyze_target": (["analyze", "{run}", "--target", "other"], "--target must be one of"),
    "analyze_small_layer": (["analyze", "{run}", "--layer", "nolayer"], "nolayer"),
    "bench_loader_batches": (["bench", "loader", "--batches", "0"], "--batches"),
    "bench_loader_workers": (["bench", "loader", "--workers", "-2"], "--workers"),
    "bench_train_steps": (["bench", "train", "--steps", "0"], "--steps"),
    "bench_train_unknown_model": (["bench", "train", "--model", "resnet99", "--set", "data.beton_dir={betons}"],
                                  "unknown model 'resnet99'"),
    "bench_loop_steps": (["bench", "loop", "{config}", "--steps", "0"], "--steps"),
    "bench_loop_missing": (["bench", "loop", "{config}.missing"], "no such config file or folder"),
    "bench_steps_rounds": (["bench", "steps", "{config}", "--rounds", "0"], "--rounds"),
    "bench_steps_missing": (["bench", "steps", "{config}.missing"], "no such config file or folder"),
    "bench_steps_bad_set": (["bench", "steps", "{config}", "--set", "train.epochs=0"], "train.epochs must be positive"),
    "models_extra_argument": (["models", "resnet18"], "unexpected extra argument"),
    "models_unknown_option": (["models", "--all"], "--all"),
    "beton_write_dataset": (["beton", "write", "--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    "beton_write_workers": (["beton", "write", "--workers", "0"], "--workers must be at least 1"),
    "beton_unknown_subcommand": (["beton", "read"], "read"),
    "unknown_command": (["trian", "{config}"], "trian"),
}


@pytest.mark.parametrize("case", list(CLI_VALUES))
def test_bad_cli_values(case, beton_dir, tmp_path, capsys):
    args, needle = CLI_VALUES[case]
    config = write_yaml(tmp_path / "tiny.yaml", tiny(beton_dir))
    run = fake_run(tmp_path / "run", beton_dir, last=b"x", best=b"x")
    if case == "analyze_small_layer":  # a real checkpoint, so the layer is what fails
        from train.config import build_config
        from train.models import create_model

        model = create_model(build_config(tiny(beton_dir)).model, num_classes=10)
        (run / "checkpoint_best.pt").write_bytes(torch_bytes({"format": 1, "epoch": 1, "model": model.state_dict()}))
    filled = [a.format(config=config, run=run, betons=beton_dir) for a in args]
    refused(capsys, filled, needle, watch=[beton_dir])


# ---------------------------------------------------------------- end to end, in a real process


def _fastcifar() -> list[str]:
    script = Path(sys.executable).parent / "fastcifar"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fastcifar_cli"]


def test_subprocess_errors_are_one_line_without_traceback(beton_dir, tmp_path):
    """Through the installed entry point: the exit code and the whole stderr, with nothing caught in-process."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    betons = copy_betons(beton_dir, tmp_path / "betons")
    _truncate(betons)
    env = {**os.environ, "FASTCIFAR_DATA": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    cases = [(["train", str(evil)], "invalid YAML"),
             (["beton", "inspect", str(betons)], "sha256 mismatch for train.beton")]
    before = snapshot(tmp_path)
    procs = [subprocess.Popen([*_fastcifar(), *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _ in cases]
    for proc, (args, needle) in zip(procs, cases):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Traceback" not in out + err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, repr(err)
    assert snapshot(tmp_path) == before
    assert not marker.exists()
