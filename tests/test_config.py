import textwrap

import pytest
import yaml

from dgxready.errors import ConfigError
from dgxready.settings import load_settings
from model.catalog import CATALOG_PATH, load_catalog


def write_catalog(tmp_path, mutate):
    data = yaml.safe_load(CATALOG_PATH.read_text())
    mutate(data)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_catalog_loads_with_pinned_files():
    catalog = load_catalog()
    mistral = catalog.model("mistral-7b-instruct-v0.3")
    assert {"safetensors-bf16", "fp8", "gguf-q4_k_m", "gguf-q8_0"} <= set(mistral.formats)
    assert mistral.formats["gguf-q4_k_m"].source.revision
    assert catalog.default == "smollm2-135m"


def test_bad_digest_names_file_and_field(tmp_path):
    def mutate(d):
        d["models"]["mistral-7b-instruct-v0.3"]["formats"]["gguf-q8_0"]["files"][0]["sha256"] = "abc"

    with pytest.raises(ConfigError) as err:
        load_catalog(write_catalog(tmp_path, mutate))
    assert str(err.value) == (
        "models.yaml: models.mistral-7b-instruct-v0.3.formats.gguf-q8_0.files[0].sha256: "
        "not a 64-hex digest"
    )


@pytest.mark.parametrize("bad", ["x; rm -rf /", "$(reboot)", "../up", "A B"])
def test_hostile_model_names_are_rejected(tmp_path, bad):
    def mutate(d):
        d["models"][bad] = d["models"].pop("smollm2-135m")
        d["default"] = bad

    with pytest.raises(ConfigError, match=r"models\.yaml: models\."):
        load_catalog(write_catalog(tmp_path, mutate))


def test_file_name_cannot_escape_the_store(tmp_path):
    def mutate(d):
        d["models"]["smollm2-135m"]["formats"]["gguf-q4_1"]["files"][0]["name"] = "../../etc/x"

    with pytest.raises(ConfigError, match=r"files\[0\]\.name: must be a relative path"):
        load_catalog(write_catalog(tmp_path, mutate))


def test_default_must_exist_and_wheel_files_need_a_member(tmp_path):
    with pytest.raises(ConfigError, match="default 'nope' is not a model"):
        load_catalog(write_catalog(tmp_path, lambda d: d.update(default="nope")))

    def mutate(d):
        del d["models"]["smollm2-135m"]["formats"]["gguf-q4_1"]["files"][0]["path_in_wheel"]

    with pytest.raises(ConfigError, match="needs path_in_wheel"):
        load_catalog(write_catalog(tmp_path, mutate))


def test_settings_yaml_errors_name_the_field(tmp_path, monkeypatch):
    path = tmp_path / "dgxready.yaml"
    path.write_text(textwrap.dedent("""
        serve:
          port: 99999
          paralel: 3
    """))
    monkeypatch.setenv("DGXREADY_CONFIG", str(path))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "dgxready.yaml: serve.port: Input should be less than or equal to 65535" in str(err.value)
    assert "dgxready.yaml: serve.paralel: Extra inputs are not permitted" in str(err.value)


def test_truncated_yaml_names_the_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: [1, 2\n")
    with pytest.raises(ConfigError, match="models.yaml: not valid YAML"):
        load_catalog(path)
