"""The one torch.save reader (nanochat.torchfile): its zip reading agrees with the standard library's
zipfile on intact archives and names what is wrong with broken ones; its unpickler and its static scan
of a pickle's globals never run the pickle's code and are not fooled by the memo."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import torchfile
from tests.modelkit import touch_payload
from tests.registry_kit import tiny_model


def rewrite_pickle(path: Path, data: bytes) -> None:
    """Replace the data.pkl member of a torch.save archive, keeping everything else."""
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, content in members:
            z.writestr(info, data if info.filename.endswith("/data.pkl") else content)


def short(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


# A protocol-4 pickle that calls posix.system, naming it only through the memo: 'posix' and 'system'
# are memoized inside a harmless list, two other strings come after, then BINGET 0, BINGET 1, STACK_GLOBAL.
MEMO_HIDDEN = (b"\x80\x04" + b"]" + b"(" + short("posix") + b"\x94" + short("system") + b"\x94"
               + short("collections") + short("OrderedDict") + b"e" + b"0"
               + b"h\x00" + b"h\x01" + b"\x93" + short("true") + b"\x85" + b"R" + b".")


@pytest.fixture
def archives(tmp_path, upstream_dir):
    """name -> (path, the problem code the reader must give, or None when the file is intact)."""
    out = {}
    for gen in ("classic", "current"):
        for p in (upstream_dir / gen / "base_checkpoints" / "d2").glob("*.pt"):
            out[f"{gen}/{p.name}"] = (p, None)
    torch.save(tiny_model().state_dict(), tmp_path / "state.pt")
    out["state"] = (tmp_path / "state.pt", None)
    torch.save({"model": tiny_model().state_dict(), "metadata": {"step": 3, "model_config": {}}}, tmp_path / "single.pt")
    out["single"] = (tmp_path / "single.pt", None)
    deflated = tmp_path / "deflated.pt"  # re-zipped with compression
    with zipfile.ZipFile(tmp_path / "state.pt") as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), zipfile.ZIP_DEFLATED)
    out["deflated"] = (deflated, None)
    commented = tmp_path / "commented.pt"  # an archive comment longer than the first read of the tail
    with zipfile.ZipFile(tmp_path / "state.pt") as src, zipfile.ZipFile(commented, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.comment = b"c" * 40_000
    out["commented"] = (commented, None)
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "prefixed.pt").write_bytes(b"#!header\n" * 100 + data)  # data before the archive, as zipfile allows
    out["prefixed"] = (tmp_path / "prefixed.pt", None)
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    out["truncated"] = (tmp_path / "truncated.pt", "truncated")
    (tmp_path / "empty.pt").write_bytes(b"")
    out["empty"] = (tmp_path / "empty.pt", "empty_file")
    out["missing"] = (tmp_path / "nothing_here.pt", "missing_file")
    (tmp_path / "text.pt").write_text("not a zip file at all" * 10)
    out["text"] = (tmp_path / "text.pt", "truncated")
    with zipfile.ZipFile(tmp_path / "plain.zip.pt", "w") as z:
        z.writestr("readme.txt", "a zip, not torch.save")
    out["plain zip"] = (tmp_path / "plain.zip.pt", "not_torch_file")
    flipped = bytearray(data)  # one bit of the pickle flipped: its CRC-32 fails
    with torchfile.Archive(tmp_path / "state.pt") as a:
        at = a.data_start(a.pickle) + 5
    flipped[at] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    out["flipped pickle"] = (tmp_path / "flipped.pt", "truncated")
    shutil.copy(tmp_path / "state.pt", tmp_path / "evil.pt")
    rewrite_pickle(tmp_path / "evil.pt", pickle.dumps(touch_payload(tmp_path / "PWNED"), protocol=2))
    out["evil"] = (tmp_path / "evil.pt", "unsafe_pickle")
    shutil.copy(tmp_path / "state.pt", tmp_path / "memo.pt")
    rewrite_pickle(tmp_path / "memo.pt", MEMO_HIDDEN)
    out["memo-hidden global"] = (tmp_path / "memo.pt", "unsafe_pickle")
    shutil.copy(tmp_path / "state.pt", tmp_path / "garbage.pt")
    rewrite_pickle(tmp_path / "garbage.pt", b"\x80\x02garbage that is no pickle")
    out["garbage"] = (tmp_path / "garbage.pt", "bad_pickle")
    return out


def reader_code(path: Path) -> str | None:
    try:
        torchfile.read_structure(path)
        return None
    except torchfile.TorchFileError as e:
        return e.code


def test_reader_agrees_with_zipfile_and_names_each_problem(archives, tmp_path):
    for name, (path, expected) in archives.items():
        assert reader_code(path) == expected, name
        if expected is not None:
            continue
        with torchfile.Archive(path) as a, zipfile.ZipFile(path) as z:
            infos = z.infolist()
            assert [(m.name, m.header_offset, m.compressed_size, m.size, m.method, m.crc) for m in a.members()] == \
                [(i.filename, i.header_offset, i.compress_size, i.file_size, i.compress_type, i.CRC) for i in infos], name
            assert a.read_pickle() == z.read(a.pickle.name), name
            assert all(a.crc_ok(m) for m in a.members()), name
            assert a.prefix == a.pickle.name.split("/")[0]
        # both ways of reading the tree see the same tensors at the same places
        stubs = torchfile.tensor_shapes(torchfile.read_structure(path))
        shapes_tree = torchfile.read_structure(path, shapes_only=True)
        top = shapes_tree.get("model", shapes_tree) if isinstance(shapes_tree, dict) else shapes_tree
        if "optim" not in name:
            prefix = "model." if "model" in shapes_tree else ""
            assert torchfile.state_dict_shapes(top) == {k.removeprefix(prefix): s.shape for k, s in stubs.items()
                                                        if k.startswith(prefix)}, name
    assert torchfile.read_structure(archives["single"][0])["metadata"] == {"step": 3, "model_config": {}}
    assert not (tmp_path / "PWNED").exists()  # nothing ran the pickle's code


def test_the_global_scan_follows_the_memo():
    # the reader itself refuses it when unpickling...
    with pytest.raises(torchfile.UnsafePickleError, match="posix.system"):
        torchfile.load_pickle(MEMO_HIDDEN)
    # ...and the static scan names it, though the last two strings written before STACK_GLOBAL are harmless
    found = torchfile.pickle_globals(MEMO_HIDDEN)
    assert ("posix", "system") in found and ("collections", "OrderedDict") not in found
    # a plain protocol-4 pickle of the same call, and a torch state dict (many BINGETs of memoized globals)
    assert ("posix", "system") in torchfile.pickle_globals(pickle.dumps(touch_payload(Path("/nonexistent")), protocol=4))
    buf = __import__("io").BytesIO()
    torch.save(tiny_model().state_dict(), buf)
    with zipfile.ZipFile(buf) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert torchfile.pickle_globals(data) <= torchfile.SAFE_GLOBALS


def test_unsafe_globals_lists_every_one_by_name(archives):
    assert torchfile.unsafe_globals(archives["memo-hidden global"][0]) == ["posix.system"]
    assert torchfile.unsafe_globals(archives["state"][0]) == []
