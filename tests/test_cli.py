"""The CLI contract: JSON shape, exit code 2 with one `error:` line for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specvlm_core import cli, testing

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return testing.build_tiny_target("qwen2_vl", tmp_path_factory.mktemp("cli-model"))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    testing.tiny_image((96, 64), 3).save(path)
    return str(path)


def run_main(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_contract(tiny_model, image_file, capsys):
    code, out, err = run_main(["generate", "--image", image_file, "--prompt", "Describe it.", "--model", tiny_model,
                               "--max-new-tokens", "12", "--json", "--threads", "1"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"ar", "spec", "identical", "speedup"}
    assert set(data["ar"]) >= {"text", "token_ids", "seconds", "new_tokens"}
    assert set(data["spec"]) >= {"text", "token_ids", "seconds", "new_tokens", "mean_accepted", "rounds"}
    assert data["identical"] is True and data["ar"]["token_ids"] == data["spec"]["token_ids"]
    assert data["speedup"] > 0 and data["spec"]["mean_accepted"] >= 1


def test_generate_one_mode_reports_the_other_as_null(tiny_model, image_file, capsys):
    code, out, _ = run_main(["generate", "--image", image_file, "--prompt", "Hi", "--model", tiny_model,
                             "--mode", "ar", "--max-new-tokens", "4", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["spec"] is None and data["identical"] is None and data["speedup"] is None


def test_gif_works_as_image_or_video(tiny_model, tmp_path, capsys):
    from specvlm_core.media import write_gif
    gif = tmp_path / "clip.gif"
    write_gif(testing.tiny_clip(4, (64, 64), 1), gif)
    for flag in ("--image", "--video"):
        code, out, err = run_main(["generate", flag, str(gif), "--prompt", "What happens?", "--model", tiny_model,
                                   "--max-new-tokens", "4", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["identical"] is True


@pytest.mark.parametrize("args,message", [
    (["--image", "/nonexistent/x.png"], "x.png"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "100000000"], "max_new_tokens"),
    (["--tree-top-k", "0"], "top_k"),
    (["--tree-depth", "99"], "depth"),
    (["--tree-total", "-3"], "total_tokens"),
    (["--prompt", "   "], "prompt is empty"),
    (["--model", "/nonexistent/model"], "not found"),
    (["--draft", "/nonexistent/draft"], "draft"),
])
def test_bad_input_exits_2_with_one_error_line(tiny_model, image_file, capsys, args, message):
    base = {"--image": image_file, "--prompt": "Describe it.", "--model": tiny_model, "--max-new-tokens": "4"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["generate"] + [x for kv in base.items() for x in kv]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_not_an_image_and_argparse_errors_follow_the_contract(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    for argv in (["generate", "--image", str(bad), "--prompt", "x"], ["generate", "--prompt", "x"],
                 ["generate", "--image", str(bad), "--prompt", "x", "--mode", "fast"], ["nonsense"]):
        proc = subprocess.run([sys.executable, "-m", "specvlm_core", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                           "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (argv, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "specvlm_core", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for name in ("generate", "distill", "bench", "tiny-train", "tiny-eval", "examples"):
        assert name in proc.stdout


def test_non_ascii_and_emoji_prompts_decode_losslessly(tiny_model, image_file, capsys):
    code, out, err = run_main(["generate", "--image", image_file, "--prompt", "Qu'est-ce que c'est ? 🙂 形は何ですか",
                               "--model", tiny_model, "--max-new-tokens", "8", "--json", "--tree", "3,3,6"], capsys)
    assert code == 0, err
    assert json.loads(out)["identical"] is True


def test_a_prompt_longer_than_the_context_is_refused(tiny_model, image_file, capsys):
    code, _, err = run_main(["generate", "--image", image_file, "--prompt", "objects " * 3000, "--model", tiny_model,
                             "--max-new-tokens", "4"], capsys)
    assert code == 2 and "context" in err and err.startswith("error:")


def test_model_load_errors_name_the_fix(tmp_path, monkeypatch):
    from transformers import BertConfig

    from specvlm_core.errors import ModelLoadError
    from specvlm_core.models import load_target
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 is set"):
        load_target("llava-hf/some-model-that-is-not-cached", device="cpu")
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_target(str(tmp_path / "nope"), device="cpu")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="supported families"):
        load_target(str(tmp_path), device="cpu")
