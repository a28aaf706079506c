"""Tokenizer: training, round trips, our data-only format, and the restricted unpickler."""

import os
import pickle

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, UnsafePickleError, read_upstream_pickle
from tests.modelkit import RunsCode, tiny_tokenizer

PROMPT = "To be, or not to be, that is the question"


def test_upstream_pickle_reads_and_encodes_like_reference(upstream_dir):
    for gen in ("classic", "current"):
        tok = Tokenizer.from_directory(upstream_dir / gen / "tokenizer")
        assert tok.get_vocab_size() == 2048
        assert tok.get_bos_token_id() == 2039
        assert tok.encode(PROMPT, prepend="<|bos|>") == [2039, 419, 308, 44, 536, 327, 292, 308, 44, 333, 330, 268, 593, 1881]
        assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(2039, 2048))


def test_token_bytes_read_from_file_keep_classic_quirk(upstream_dir):
    classic = Tokenizer.from_directory(upstream_dir / "classic" / "tokenizer").token_bytes()
    current = Tokenizer.from_directory(upstream_dir / "current" / "tokenizer").token_bytes()
    assert classic[200] == 3 and current[200] == 1  # classic counted ids 128-255 as U+FFFD
    assert current[2039:] == [0] * 9 and current[65] == 1


def test_train_roundtrip_and_save_load(tmp_path):
    tok = tiny_tokenizer(300)
    assert tok.get_vocab_size() == 300
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(291, 300))
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  émoji ✓ 123456"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.encode([text, "x"], prepend="<|bos|>")[1][0] == tok.get_bos_token_id()
    path = tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json" and (tmp_path / "tok" / "token_bytes.pt").exists()
    assert (tmp_path / "tok" / "tokenizer.pkl").exists()
    again = Tokenizer.from_directory(tmp_path / "tok")
    assert again.encode(text) == ids
    assert again.token_bytes() == tok.token_bytes()
    assert sum(again.token_bytes()[i] for i in ids) == len(text.encode("utf-8"))
    assert b"pickle" not in path.read_bytes()[:100]


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every class or function a pickle references (protocol 4: STACK_GLOBAL takes the two strings before it)."""
    import pickletools

    strings, found = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.append((strings[-2], strings[-1]))
        elif op.name in ("GLOBAL", "INST"):
            found.append(tuple(arg.split(" ", 1)))
    return found


def test_we_write_upstreams_tokenizer_pickle(tmp_path, upstream_dir):
    """tokenizer.pkl as upstream's loader expects it: for upstream's own vocabulary our file is byte for byte
    upstream's; for one we trained, the same opcodes around the data and the one global tiktoken.core.Encoding.
    We read it back only through the restricted reader."""
    import pickletools

    fixture = (upstream_dir / "current" / "tokenizer" / "tokenizer.pkl").read_bytes()
    Tokenizer.from_directory(upstream_dir / "current" / "tokenizer").save(tmp_path / "same")
    assert (tmp_path / "same" / "tokenizer.pkl").read_bytes() == fixture
    tok = tiny_tokenizer(300)
    tok.save(tmp_path / "ours")
    ours = (tmp_path / "ours" / "tokenizer.pkl").read_bytes()
    assert pickle_globals(ours) == pickle_globals(fixture) == [("tiktoken.core", "Encoding")]
    names = [[op.name for op, _, _ in pickletools.genops(b)] for b in (ours, fixture)]
    assert names[0][:12] == names[1][:12] and names[0][-3:] == names[1][-3:]  # PROTO 4 ... NEWOBJ {..} BUILD STOP
    assert set(names[0]) <= set(names[1]) | {"BININT", "BINUNICODE", "BINBYTES"}
    assert ours[:2] == b"\x80\x04"
    (tmp_path / "ours" / "tokenizer.json").unlink()
    again = Tokenizer.from_directory(tmp_path / "ours")  # only the pickle is left: the restricted reader
    assert again.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert again.enc._special_tokens == tok.enc._special_tokens and again.enc._pat_str == tok.enc._pat_str
    assert read_upstream_pickle(tmp_path / "ours" / "tokenizer.pkl").name == "rustbpe"


def test_tok_train_exports_the_pickle_for_an_existing_tokenizer(tmp_path, monkeypatch, capsys):
    from scripts import tok_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert tok_train.main(["--export-pickle"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    tok = tiny_tokenizer(300)
    tok.save(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "tokenizer.pkl").unlink()  # a base dir written before we wrote the pickle
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    assert tok_train.main(["--export-pickle"]) == 0
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before
    assert read_upstream_pickle(tmp_path / "tokenizer" / "tokenizer.pkl")._mergeable_ranks == tok.enc._mergeable_ranks


def test_special_tokens_in_text_are_plain_text():
    tok = tiny_tokenizer(300)
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids and tok.decode(ids) == "<|bos|>"


def test_chat_rendering():
    tok = tiny_tokenizer(300)
    ids = tok.render_chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids[0] == tok.get_bos_token_id()
    assert ids[1] == tok.encode_special("<|user_start|>") and ids[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(ids[2:-2]) == "Be brief.\n\nHi"
    with pytest.raises(TokenizerError, match="should be from user"):
        tok.render_chat_prompt([{"role": "assistant", "content": "x"}])
    with pytest.raises(TokenizerError, match="end with a user"):
        tok.render_chat_prompt([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_out_of_vocabulary_ids_are_refused():
    tok = tiny_tokenizer(300)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([1, 300])
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.encode_special("<|nope|>")



@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_malicious_tokenizer_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = RunsCode(os.system, f"touch {marker}")
    else:
        payload = RunsCode(exec, f"open({str(marker)!r}, 'w').write('x')")
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError, match="only tiktoken.core.Encoding is allowed"):
        Tokenizer.from_directory(tmp_path)
    assert not marker.exists()


def test_pickle_with_encoding_but_string_state_is_refused(tmp_path):
    """tiktoken's own __setstate__ would turn a string into a registry lookup; our stub never does."""
    data = (b"\x80\x04\x8c\rtiktoken.core\x94\x8c\x08Encoding\x94\x93\x94)\x81\x94\x8c\x0bcl100k_base\x94b.")
    (tmp_path / "tokenizer.pkl").write_bytes(data)
    with pytest.raises(TokenizerError, match="does not hold a tiktoken Encoding"):
        read_upstream_pickle(tmp_path / "tokenizer.pkl")


@pytest.mark.parametrize("content,match", [
    (b"", "not a readable tokenizer pickle"),
    (b"\x80\x04garbage", "not a readable tokenizer pickle"),
])
def test_broken_tokenizer_files(tmp_path, content, match):
    (tmp_path / "tokenizer.pkl").write_bytes(content)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_directory(tmp_path)


def test_truncated_upstream_pickle(tmp_path, upstream_dir):
    data = (upstream_dir / "current" / "tokenizer" / "tokenizer.pkl").read_bytes()
    (tmp_path / "tokenizer.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match="not a readable tokenizer pickle"):
        Tokenizer.from_directory(tmp_path)


def test_our_format_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"format": "other"}')
    with pytest.raises(TokenizerError, match="is not a nanochat-workbench-tokenizer file"):
        Tokenizer.from_directory(tmp_path)


def test_vocab_too_small_to_train():
    with pytest.raises(TokenizerError, match="from 265 to"):
        Tokenizer.train_from_iterator(["abc"], 100)


def test_encode_threads_follow_the_cores_this_process_may_use(monkeypatch):
    from nanochat import tokenizer as tk

    monkeypatch.setattr(tk.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert tk.encode_threads() == 3
    assert tk.encode_threads(2) == 2  # never more threads than texts
    assert tk.encode_threads(0) == 1
