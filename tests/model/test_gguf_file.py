"""model/gguf_file.py reads the embedded GGUF's tensor table as gguf-py does (names, types,
shapes, bytes) without decoding the tokenizer's metadata, and refuses what is no GGUF."""
import numpy as np
import pytest

from anee_fast.model import default_model
from anee_fast.model.gguf_file import GGUFFile, GGUFFileError

gguf = pytest.importorskip("gguf")


def test_tensor_table_matches_gguf_py():
    path = default_model.gguf_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields["general.architecture"] == "llama"
    assert ours.fields["llama.block_count"] == 30
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.kind == t.tensor_type.name.lower()
        assert mine.shape == tuple(int(x) for x in t.shape)
        assert np.array_equal(mine.data, np.asarray(t.data).view(np.uint8).reshape(mine.data.shape))


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(GGUFFileError, match="not a GGUF file"):
        GGUFFile(path)
