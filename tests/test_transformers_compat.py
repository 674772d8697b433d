"""The remote code's transformers range: a one-line error below the floor, real import errors never hidden by the
top-level fallback, and the newest API used on the installed (newest) release."""

import importlib
import importlib.util
import shutil
import sys

import pytest
import transformers

import configuration_minigpt4
from configuration_minigpt4 import (
    CACHE_ARGUMENT,
    MINIMUM_TRANSFORMERS_VERSION,
    MiniGPT4Config,
    check_transformers_version,
    transformers_since,
)
from conftest import REPO_ROOT
from processing_minigpt4 import MiniGPT4Processor


ROOT_FILES = ("configuration_minigpt4.py", "modeling_minigpt4.py", "processing_minigpt4.py")


def load_as_remote_code(folder, package: str, module: str):
    """Imports `folder/module.py` as `package.module`, the way transformers imports a Hub repo's code."""
    spec = importlib.util.spec_from_file_location(package, folder / "__init__.py", submodule_search_locations=[
        str(folder)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{module}")


@pytest.fixture
def remote_code_folder(tmp_path):
    """A package holding the three root files, removed from `sys.modules` afterwards."""
    folder = tmp_path / "minigpt4_remote_code"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ROOT_FILES:
        shutil.copy(REPO_ROOT / name, folder / name)
    yield folder
    for name in [name for name in sys.modules if name.split(".")[0] == folder.name]:
        del sys.modules[name]


def test_importing_the_remote_code_under_a_release_below_the_floor_raises_one_line(remote_code_folder, monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    with pytest.raises(ImportError) as error:
        load_as_remote_code(remote_code_folder, remote_code_folder.name, "processing_minigpt4")
    assert str(error.value) == (
        f"MiniGPT-4's remote code needs transformers >= {MINIMUM_TRANSFORMERS_VERSION} (found 4.56.2): "
        f'pip install -U "transformers>={MINIMUM_TRANSFORMERS_VERSION}"'
    )


@pytest.mark.parametrize("found", [MINIMUM_TRANSFORMERS_VERSION, "4.57.6", "5.0.0", "5.24.0", "6.0.0.dev0"])
def test_the_floor_and_newer_releases_and_development_builds_are_accepted(found):
    check_transformers_version(found)


def test_a_failing_import_inside_the_remote_code_is_not_replaced_by_the_top_level_fallback(remote_code_folder):
    (remote_code_folder / "configuration_minigpt4.py").write_text(
        "raise ImportError(\"cannot import name 'SomethingNew' from 'transformers'\")\n"
    )
    for module in ("modeling_minigpt4", "processing_minigpt4"):
        with pytest.raises(ImportError, match="cannot import name 'SomethingNew'"):
            load_as_remote_code(remote_code_folder, remote_code_folder.name, module)


def test_the_installed_release_gets_the_newest_api():
    """The test suite runs on the newest supported transformers: every compatibility switch takes its newest branch."""
    assert transformers_since("5.24")
    assert CACHE_ARGUMENT == "cache"
    assert configuration_minigpt4.CompositeConfig is transformers.PreTrainedConfig
    assert configuration_minigpt4.BlipImageProcessorPil is transformers.BlipImageProcessorPil
    assert all(type(spec).__name__ == "SubConfigSpec" for spec in MiniGPT4Config.sub_configs_defaults.values())


def test_the_processor_reloads_the_image_processor_class_it_was_saved_with(tiny_shared, tiny_saved_dir):
    _, processor = tiny_shared
    reloaded = MiniGPT4Processor.from_pretrained(tiny_saved_dir)
    assert type(reloaded.image_processor) is type(processor.image_processor)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
