"""`lmforge tokenizer train`: from text files, from a prepared data folder, and its usage errors."""

import json

import pytest

from lmforge.cli import main
from lmforge.data import prepare
from lmforge.data.config import DataPrepConfig
from lmforge.data.training_data import prepared_documents
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def texts(tiny_text) -> list[str]:
    return [tiny_text[i : i + 4000] for i in range(0, 80_000, 4000)]


def test_trains_the_tokenizer_that_the_library_trains_on_the_same_text(tmp_path, texts, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(texts[0])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:]))
    main(["tokenizer", "train", str(folder), "--vocab-size", "300", "--output", str(tmp_path / "tok")])
    assert "300 tokens" in capsys.readouterr().out
    tokenizer = Tokenizer.load(tmp_path / "tok")
    assert tokenizer.sha256 == Tokenizer.train(texts, 300).sha256
    assert tokenizer.decode(tokenizer.encode(texts[3])) == texts[3]
    assert (tmp_path / "tok/tokenizer_config.json").is_file()  # loads in transformers too


def test_trains_on_a_prepared_folders_kept_text(tmp_path, texts):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "prepared"
    prepare.main(DataPrepConfig(input=str(tmp_path / "in.jsonl"), output=str(out), vocab_size=280, workers=1))
    main(["tokenizer", "train", str(out), "--vocab-size", "320", "--output", str(tmp_path / "tok")])
    kept = [d.text for d in prepared_documents(out)]
    assert kept and Tokenizer.load(tmp_path / "tok").sha256 == Tokenizer.train(kept, 320).sha256


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab-size", "100"], "--vocab-size=100 must be >= 263"),
        (["--min-frequency", "0"], "tokenizer.min_frequency=0 must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, texts, capsys, args, message):
    (tmp_path / "a.txt").write_text(texts[0])
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(tmp_path / "a.txt"), "--output", str(tmp_path / "tok"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_missing_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(tmp_path / "nothing"), "--output", str(tmp_path / "tok")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
