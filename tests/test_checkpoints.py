import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill import DistillError
from distill.io.checkpoints import INDEX_NAME, Checkpoint, ShardedWriter, copy_through, parse_size
from distill.io.files import atomic_dir
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = make_tokenizer()
    make_model(root / "single", tokenizer=tok)
    make_model(root / "sharded", tokenizer=tok, max_shard_size="20KB")
    return root


def test_sharded_and_single_read_the_same_tensors(models):
    single, sharded = Checkpoint.open(models / "single"), Checkpoint.open(models / "sharded")
    assert len({i.file for i in sharded.tensors.values()}) > 2  # really sharded
    assert set(single.names()) == set(sharded.names())
    for name, tensor in sharded.iter_tensors():
        assert torch.equal(tensor, single.get(name)), name
    assert single.config["model_type"] == "mistral"
    assert single.get("model.embed_tokens.weight", stop=5).shape == (5, 32)


def test_writer_shards_and_indexes_a_plan(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(10).to(torch.bfloat16), "c": torch.tensor(3.0),
               "d": torch.randn(128, 64), "e": torch.arange(6, dtype=torch.int64)}
    plan = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, plan, max_shard_size=20_000) as w:
        for name in reversed(list(tensors)):  # any order: bytes go to their planned offsets
            w.write(name, tensors[name])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    loaded = {}
    for f in files:  # the reference reader accepts every shard
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype


def test_writer_single_shard_has_no_index_and_checks_plan(tmp_path):
    with ShardedWriter(tmp_path, [("x", (2, 2), torch.float32)]) as w:
        with pytest.raises(DistillError, match="planned"):
            w.write("x", torch.zeros(3))
        w.write("x", torch.ones(2, 2))
    assert not (tmp_path / INDEX_NAME).exists()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["x"], torch.ones(2, 2))
    (tmp_path / "partial").mkdir()
    with pytest.raises(DistillError, match="never written"):
        with ShardedWriter(tmp_path / "partial", [("y", (1,), torch.float32)]):
            pass


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(DistillError, match="cannot parse size"):
        parse_size("lots")


def test_copy_through_takes_config_and_tokenizer(models, tmp_path):
    copied = copy_through(models / "single", tmp_path)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    assert not any(n.endswith(".safetensors") for n in copied)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(models, tmp_path):
    d = _copy(models / "sharded", tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(DistillError, match=f"{victim.name} is missing"):
        Checkpoint.open(d)


def test_truncated_file_is_named(models, tmp_path):
    d = _copy(models / "single", tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DistillError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(d)
    f.write_bytes(b"\x05")
    with pytest.raises(DistillError, match="truncated or empty"):
        Checkpoint.open(d)


def test_stale_index_is_reported(models, tmp_path):
    d = _copy(models / "sharded", tmp_path / "m")
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(DistillError, match="stale"):
        Checkpoint.open(d)


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(DistillError, match=r"only pickle weights \(pytorch_model\.bin\).*never unpickles.*"
                                           r"save_pretrained"):
        Checkpoint.open(tmp_path)


def test_missing_config_and_missing_dir(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(DistillError, match="no config.json"):
        Checkpoint.open(tmp_path)
    assert Checkpoint.open(tmp_path, require_config=False).names() == ["x"]
    with pytest.raises(DistillError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope", require_config=False)


def test_atomic_output_refuses_existing_dir(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(DistillError, match="already exists.*--overwrite"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_atomic_output_gets_a_plain_directory_mode(tmp_path):
    # tempfile.mkdtemp makes 0700 directories; renamed into place, that mode hid outputs from others
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_row_chunks_cover_every_row_once():
    from distill.io.streaming import row_chunks

    assert row_chunks((10, 4), max_elements=12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_chunks((10, 4), stop=7, max_elements=100) == [(0, 7)]
    assert row_chunks((), max_elements=1) == [(0, None)]
    assert row_chunks((5,), max_elements=2) == [(0, 2), (2, 4), (4, 5)]


def test_pipelined_keeps_order_and_raises():
    import time

    from distill.io.streaming import pipelined

    def slow_square(x):
        time.sleep(0.01 * max(0, 5 - x))  # later jobs finish first
        if x == 7:
            raise ValueError("job 7")
        return x * x

    assert list(pipelined(slow_square, range(5), workers=3)) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="job 7"):
        list(pipelined(slow_square, range(10), workers=2))


def test_writer_accepts_row_chunks_from_threads(tmp_path):
    from distill.io.streaming import pipelined, row_chunks

    t = torch.randn(37, 5)
    with ShardedWriter(tmp_path, [("t", t.shape, t.dtype)]) as w:
        list(pipelined(lambda c: w.write("t", t[c[0]:c[1]], c[0]), row_chunks(t.shape, max_elements=20), 3))
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)
    with ShardedWriter(tmp_path, [("t", t.shape, t.dtype)]) as w:
        with pytest.raises(DistillError, match="rows 30..40"):
            w.write("t", t[:10], 30)
        w.write("t", t)


def test_one_dtype_parser():
    from distill.evaluate.generate import resolve_device_dtype
    from distill.io.checkpoints import dtype_from_name
    from distill.io.models import default_dtype, torch_dtype

    for names, dtype in ((("float32", "fp32", "FLOAT", "float"), torch.float32),
                         (("bfloat16", "bf16", "BF16"), torch.bfloat16),
                         (("float16", "fp16", "half"), torch.float16)):
        for name in names:
            assert torch_dtype(name) == dtype == dtype_from_name(name) == resolve_device_dtype("cpu", name)[1]
    assert torch_dtype(torch.bfloat16) == torch.bfloat16
    assert torch_dtype(None, "cpu") == torch_dtype("auto", "cpu") == default_dtype("cpu") == torch.float32
    assert dtype_from_name(None) is None
    for bad in ("int8", "nope", "bool"):
        with pytest.raises(DistillError, match="unknown floating-point dtype"):
            torch_dtype(bad)
    with pytest.raises(DistillError, match="use float32, bfloat16 or float16$"):
        dtype_from_name("auto")  # a storage dtype: "auto" is the chat-vector config's to resolve
