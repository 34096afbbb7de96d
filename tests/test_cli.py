"""The `binarylm tokenizer` commands, as a user runs them."""

import subprocess
import sys

import pytest

from binarylm.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    (folder / "b.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(out), "--quiet"]) == 0
    return out


def test_train_writes_a_loadable_tokenizer(trained, capsys):
    from binarylm.tokenizer import load

    assert load(trained).vocab_size == 300


def test_encode_then_decode(trained, capsys):
    assert main(["tokenizer", "encode", "-t", str(trained), "the lazy fox"]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "-t", str(trained), *ids]) == 0
    assert capsys.readouterr().out == "the lazy fox\n"


def test_encode_show_and_special_tokens(trained, capsys):
    assert main(["tokenizer", "encode", "-t", str(trained), "--show", "--allow-special", "hi<|endoftext|>"]) == 0
    shown, ids = capsys.readouterr().out.splitlines()
    assert '"<|endoftext|>"' in shown and ids.split()[-1] == "296"
    assert main(["tokenizer", "encode", "-t", str(trained), "hi<|endoftext|>"]) == 2
    assert "allowed_special" in capsys.readouterr().err


def test_stats_compares_with_cl100k(trained, corpus, capsys):
    assert main(["tokenizer", "stats", "-t", str(trained), str(corpus / "a.txt")]) == 0
    out = capsys.readouterr().out
    assert "ours" in out and "cl100k_base" in out and "bytes/token" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tokenizer", "train", "/no/such/dir", "-o", "x.json"], "does not exist"),
        (["tokenizer", "train", "--vocab-size", "10", "-o", "x.json"], "too small"),
        (["tokenizer", "encode", "-t", "/no/such.json", "x"], "no tokenizer at"),
        (["tokenizer", "decode", "-t", "cl100k_base", "12", "abc"], "whole numbers"),
        (["tokenizer", "decode", "-t", "cl100k_base", "999999999"], "not in this tokenizer"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_entry_point_help_runs():
    result = subprocess.run([sys.executable, "-m", "binarylm", "tokenizer", "train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--vocab-size" in result.stdout


def test_misspelt_option_suggests_the_real_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--vocab-sise", "300"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--vocab-sise" in err and "did you mean --vocab-size" in err and "binarylm tokenizer train" in err
