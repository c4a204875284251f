"""Recipe files give the same pipeline as the flags (CLI and Python API)."""
from __future__ import annotations

import json

import pytest

import squeeze
from squeeze.cli import main
from squeeze.recipe import RecipeError, arguments, load

from conftest import REPO


@pytest.mark.parametrize("name", ["digits.yaml", "digits.toml"])
def test_example_recipes_parse_to_the_same_settings(name):
    r = load(REPO / "examples" / name)
    assert r["passes"] == "cleanup,fold-bn"
    assert r["target"] == "cpu"
    assert r["max_drop"] == 1.0
    assert r["model"].endswith("models/digits_cnn.onnx")


def test_recipe_matches_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {REPO / 'models/digits_cnn.onnx'}\npasses:\n  - cleanup\n  - fold-bn: {{}}\n"
                      f"eval: {REPO / 'models/digits_test.npz'}\noutput: out_recipe\nseed: 3\n")
    assert main(["--recipe", str(recipe), "--target", "none"]) == 0
    assert main([str(REPO / "models/digits_cnn.onnx"), "--passes", "cleanup,fold-bn", "--eval",
                 str(REPO / "models/digits_test.npz"), "--seed", "3", "--target", "none", "-o",
                 str(tmp_path / "out_flags")]) == 0
    a = json.loads((tmp_path / "out_recipe/report.json").read_text())
    b = json.loads((tmp_path / "out_flags/report.json").read_text())
    assert a["pass_spec"] == b["pass_spec"] == "cleanup,fold-bn"
    assert a["seed"] == b["seed"] == 3
    assert a["accuracy"] == b["accuracy"]
    assert (tmp_path / "out_recipe/model.onnx").read_bytes() == (tmp_path / "out_flags/model.onnx").read_bytes()


def test_flags_override_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{REPO / "models/digits_cnn.onnx"}"\npasses = "cleanup"\noutput = "o"\n')
    assert main(["--recipe", str(recipe), "--passes", "fold-bn", "--target", "none"]) == 0
    assert json.loads((tmp_path / "o/report.json").read_text())["pass_spec"] == "fold-bn"


def test_python_api_takes_recipe_arguments(tmp_path):
    kwargs = arguments(REPO / "examples/digits.yaml")
    kwargs.update(out_dir=tmp_path / "api", targets="")
    result = squeeze.compress(**kwargs)
    assert result.ok and result.report["pass_spec"] == "cleanup,fold-bn"
    assert (tmp_path / "api/report.json").is_file()


@pytest.mark.parametrize("text,message", [
    ("passes: [cleanup]\nbogus: 1\n", "unknown setting"),
    ("- just\n- a list\n", "mapping"),
    ("passes: [{cleanup: 3}]\n", "must be a mapping"),
    ("passes: [: :\n", "cannot parse"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load(recipe)
    assert main(["--recipe", str(recipe)]) == 2


def test_recipe_metric_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "dict.txt").write_text("a\n")
    (tmp_path / "r.yaml").write_text("model: m.onnx\nmetric: ctc:dict.txt\n")
    assert load(tmp_path / "r.yaml")["metric"] == f"ctc:{tmp_path / 'dict.txt'}"
    (tmp_path / "r.toml").write_text('model = "m.onnx"\nmetric = {mask-iou = 0.2}\n')
    assert arguments(tmp_path / "r.toml")["metric"] == "mask-iou:0.2"
