"""benchmarks/stand_in_towers.py: random-weight towers with the real architectures, never passed off as real."""

import sys

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from modeling_mmretrieval.towers import MINILM, MissingOfflineTowerError, get_dinov2_small_path, get_minilm_path

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import stand_in_towers  # noqa: E402

try:
    REAL_MINILM = get_minilm_path()
    REAL_DINOV2 = get_dinov2_small_path()
except MissingOfflineTowerError:  # pragma: no cover - install.sh installs both
    REAL_MINILM = REAL_DINOV2 = None

needs_real_towers = pytest.mark.skipif(REAL_MINILM is None, reason="needs the offline tower packages")


@pytest.fixture()
def exported(tmp_path):
    stand_in_towers.export_files(tmp_path / "files")
    return tmp_path / "files"


@needs_real_towers
def test_export_copies_settings_and_never_weights(exported):
    copied = {path.relative_to(exported).as_posix() for path in exported.rglob("*") if path.is_file()}
    assert copied == {f"minilm/{name}" for name in stand_in_towers.MINILM_FILES} | {
        f"dinov2/{name}" for name in stand_in_towers.DINOV2_SETTINGS_FILES
    }
    assert sum(path.stat().st_size for path in exported.rglob("*")) < 2 << 20


@needs_real_towers
def test_install_refuses_to_shadow_an_installed_tower(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("MMRETRIEVAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="refusing to shadow"):
        stand_in_towers.install(exported, tmp_path / "site")
    assert not (tmp_path / "site").exists()


@needs_real_towers
def test_stand_ins_have_the_real_architectures_and_fresh_weights(exported, tmp_path, monkeypatch):
    cache, site = tmp_path / "cache", tmp_path / "site"
    monkeypatch.setenv("MMRETRIEVAL_CACHE", str(cache))
    # As on a machine without the tower package: nothing to shadow.
    real_find_spec = stand_in_towers.importlib.util.find_spec
    monkeypatch.setattr(stand_in_towers.importlib.util, "find_spec",
                        lambda name, *args: None if name == MINILM.module else real_find_spec(name, *args))
    package, dinov2_folder = stand_in_towers.install(exported, site)

    for stand_in_folder, real_folder in ((package / MINILM.relative_path, REAL_MINILM), (dinov2_folder, REAL_DINOV2)):
        assert stand_in_towers.is_stand_in(stand_in_folder) and not stand_in_towers.is_stand_in(real_folder)
        stand_in, real = AutoModel.from_pretrained(stand_in_folder), AutoModel.from_pretrained(real_folder)
        assert type(stand_in) is type(real)
        stand_in_shapes = {name: tensor.shape for name, tensor in stand_in.state_dict().items()}
        assert stand_in_shapes == {name: tensor.shape for name, tensor in real.state_dict().items()}
        differing = [name for name, tensor in stand_in.state_dict().items()
                     if tensor.is_floating_point() and not torch.equal(tensor, real.state_dict()[name])]
        assert len(differing) > len(stand_in_shapes) // 2

    text = ["Navy blue slim fit cotton shirt for men"]
    assert AutoTokenizer.from_pretrained(package / "model")(text) == AutoTokenizer.from_pretrained(REAL_MINILM)(text)
    assert AutoImageProcessor.from_pretrained(dinov2_folder).to_dict() == \
        AutoImageProcessor.from_pretrained(REAL_DINOV2).to_dict()

    # A second install over its own stand-ins is allowed; over a converted (real) folder it is not.
    stand_in_towers.install(exported, site)
    (dinov2_folder / stand_in_towers.STAND_IN_MARKER).unlink()
    with pytest.raises(SystemExit, match="refusing to replace"):
        stand_in_towers.install(exported, site)
