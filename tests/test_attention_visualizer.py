"""tools/attention_visualizer.py on a real upstream checkpoint: the --json shape (per layer and head the
attention matrix and the layer's window), the offline HTML and the PNG, and one-line errors."""

import json
import re

import pytest

from tools import attention_visualizer as av

PROMPT = "To be, or not to be, that is the question"


@pytest.fixture
def ckpt(upstream_dir):
    return str(upstream_dir / "current" / "base_checkpoints" / "d2")


def run(capsys, *argv):
    code = av.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_holds_every_layer_and_head_with_windows(ckpt, capsys):
    code, out, err = run(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--json")
    assert code == 0, err
    doc = json.loads(out)
    t = len(doc["tokens"])
    assert doc["tokens"][0]["text"] == "<|bos|>" and t == 14
    assert [ly["layer"] for ly in doc["layers"]] == [0, 1] and [ly["window"] for ly in doc["layers"]] == [128, 128]
    for ly in doc["layers"]:
        assert [h["head"] for h in ly["heads"]] == [0, 1]
        for h in ly["heads"]:
            m = h["attention"]
            assert len(m) == t and all(len(r) == t for r in m)
            assert all(abs(sum(r) - 1) < 1e-4 for r in m)
            assert all(r[j] == 0 for i, r in enumerate(m) for j in range(i + 1, t))  # causal
            assert set(h["scores"]) == {"entropy", "mean_distance", "bos", "previous", "same_token", "pattern"}
    lens = doc["logit_lens"]
    assert lens["position"] == t - 1 and len(lens["layers"]) == 2 and len(lens["layers"][0]["top"]) == 5


def test_layer_and_head_filter_the_output(ckpt, capsys):
    code, out, _ = run(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--json", "--layer", "1", "--head", "0")
    doc = json.loads(out)
    assert code == 0 and [ly["layer"] for ly in doc["layers"]] == [1] and [h["head"] for h in doc["layers"][0]["heads"]] == [0]
    code, out, _ = run(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--position", "2", "--top", "2")
    assert code == 0 and "logit lens at position 2" in out and "kv window" in out


def test_html_is_standalone_and_png_is_written(ckpt, capsys, tmp_path):
    page = tmp_path / "att.html"
    code, out, err = run(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--out", str(page))
    assert code == 0, err
    text = page.read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text)  # nothing loaded from the network
    assert "<script>" in text and '"window": 128' in text and "L1 H1" not in text  # labels are drawn by the script
    png = tmp_path / "att.png"
    code, _, err = run(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--out", str(png), "--layer", "0")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "la " * 200], "beyond this model's context of 128"),
    (["--prompt", PROMPT, "--layer", "5"], "--layer 5: this model has layers 0..1"),
    (["--prompt", PROMPT, "--position", "99"], "--position 99"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_bad_input_is_one_line(ckpt, capsys, argv, message):
    code, out, err = run(capsys, "--checkpoint", ckpt, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err


def test_unloadable_checkpoint_and_bad_arguments(tmp_path, capsys):
    bad = tmp_path / "base_checkpoints" / "d1"
    bad.mkdir(parents=True)
    (bad / "model_000001.pt").write_bytes(b"not a zip")
    (bad / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": {}}))
    code, _, err = run(capsys, "--checkpoint", str(bad), "--prompt", "x")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        av.build_parser().parse_args([])  # --checkpoint and --prompt are required
    assert e.value.code == 2
    assert av.main(["--checkpoint", str(bad), "--prompt", "x", "--out", str(tmp_path / "a.svg")]) == 2
