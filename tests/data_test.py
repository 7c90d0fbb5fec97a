"""Data: JSONL reading errors, tokenization masks, batching and iterator state."""

import json

import numpy as np
import pytest

from cai_jax import data
from cai_jax.tokenizer import load_tokenizer

TOK = load_tokenizer("byte")


def test_jsonl_errors_name_file_and_line(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"text": "a"}\n{bad\n')
  with pytest.raises(data.DataError, match=r"d.jsonl:2: invalid JSON"):
    data.read_jsonl(str(p))
  p.write_text("")
  with pytest.raises(data.DataError, match="no examples"):
    data.read_jsonl(str(p))
  with pytest.raises(data.DataError, match="nope.jsonl"):
    data.read_jsonl(str(tmp_path / "nope.jsonl"))


def test_example_forms():
  assert data.example_messages({"text": "x"}) is None
  msgs = data.example_messages({"prompt": "p", "completion": "c"})
  assert [m["role"] for m in msgs] == ["user", "assistant"]
  with pytest.raises(data.DataError, match="expected a 'text'"):
    data.example_messages({"foo": 1}, "f.jsonl: example 3")


def test_text_example_trains_every_token_and_pads_right():
  out = data.tokenize_example({"text": "hi"}, TOK, "chatml", 8)
  assert out["tokens"].tolist()[:3] == [ord("h"), ord("i"), TOK.eos_id]
  assert out["mask"].tolist() == [True] * 3 + [False] * 5
  assert out["loss_mask"].tolist() == [True] * 3 + [False] * 5
  assert (out["tokens"][3:] == TOK.pad_id).all()


def test_chat_example_trains_assistant_tokens_only():
  out = data.tokenize_example({"prompt": "hi", "completion": "yo"}, TOK, "raw", 40)
  text = "\n\nHuman: hi\n\nAssistant: yo"
  n = int(out["mask"].sum())
  trained = "".join(chr(t) for t, m in zip(out["tokens"][:n], out["loss_mask"][:n]) if m and t < 256)
  assert trained.strip() == "yo"
  assert bytes(int(t) for t in out["tokens"][:len(text)]).decode() == text


def test_truncation_on_the_right():
  out = data.tokenize_example({"text": "abcdefghij"}, TOK, "chatml", 4)
  assert out["tokens"].tolist() == [ord(c) for c in "abcd"] and out["mask"].all()


def test_batches_fixed_shape_and_iterator_resumes_exactly():
  examples = [{"text": f"example {i}"} for i in range(10)]
  ds = data.lm_dataset(examples, TOK, "chatml", 16, 4, seed=3).dataset()
  it = iter(ds.to_iter_dataset())
  first = next(it)
  assert first["tokens"].shape == (4, 16) and first["tokens"].dtype == np.int32
  state = it.get_state()
  json.dumps(state)  # JSON-serialisable
  expected = [next(it)["tokens"] for _ in range(4)]   # crosses an epoch boundary
  it2 = iter(ds.to_iter_dataset())
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["tokens"], e)


def test_too_small_dataset_is_named():
  with pytest.raises(data.DataError, match="fewer than batch_size=8"):
    data.lm_dataset([{"text": "a"}] * 3, TOK, "chatml", 8, 8, 0)


def test_tfds_array_record_dataset_read_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  class ToyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"prompt": tfds.features.Text(), "completion": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"prompt": f"q{i}", "completion": f"a{i}"}

  ToyChat(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  examples = data.load_examples("tfds:toy_chat:train", data_dir=str(tmp_path))
  assert len(examples) == 6
  got = sorted((examples[i]["prompt"], examples[i]["completion"]) for i in range(6))
  assert got == [(f"q{i}", f"a{i}") for i in range(6)]
  ds = data.lm_dataset(examples, TOK, "chatml", 32, 2, seed=0)
  assert ds[0]["tokens"].shape == (2, 32)
  with pytest.raises(data.DataError, match="tfds:NAME:SPLIT"):
    data.load_examples("tfds:only_name")


def test_batches_encode_only_the_rows_asked_for():
  """dataset(rows) holds those positions of every global batch, encoding nothing else;
  its iterator state is the global one (a process's rows do not change it)."""
  items = [{"text": f"example {i}"} for i in range(10)]
  calls = []

  def encode(item):
    calls.append(item["text"])
    return {"tokens": np.array([int(item["text"].split()[1])], np.int32)}

  batches = data.Batches(items, encode, batch_size=4, seed=3)
  whole = [batches[k]["tokens"][:, 0].tolist() for k in range(4)]   # crosses an epoch
  assert sorted(whole[0] + whole[1]) == sorted(set(whole[0] + whole[1]))   # no repeats in an epoch
  calls.clear()
  part = batches.dataset(rows=[1, 3])
  for k in range(4):
    assert part[k]["tokens"][:, 0].tolist() == [whole[k][1], whole[k][3]]
  assert len(calls) == 8
  it = iter(part.to_iter_dataset())
  next(it)
  state = it.get_state()
  it_whole = iter(batches.dataset().to_iter_dataset())
  it_whole.set_state(state)
  assert next(it_whole)["tokens"][:, 0].tolist() == whole[1]


@pytest.mark.parametrize("example, message", [
    ({"text": 5}, r"'text' must be a string, got int"),
    ({"prompt": 1, "completion": "c"}, r"'prompt' must be a string, got int"),
    ({"prompt": "p", "completion": None}, r"'completion' must be a string, got NoneType"),
    ({"messages": [{"role": "user", "content": None}]},
     r"messages\[0\].content must be a string, got NoneType"),
    ({"messages": [{"role": "", "content": "x"}]}, r"messages\[0\].role must be a non-empty string"),
])
def test_field_types_are_named(example, message):
  with pytest.raises(data.DataError, match=f"^f.jsonl: example 3: {message}$"):
    data.example_messages(example, "f.jsonl: example 3")
  with pytest.raises(data.DataError, match=f"^f.jsonl: example 3: {message}$"):
    data.tokenize_example(example, TOK, "chatml", 16, "f.jsonl: example 3")


def test_a_conversation_without_an_assistant_turn_is_not_a_training_example():
  sharegpt = {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}
  assert not data.tokenize_example(sharegpt, TOK, "chatml", 64)["loss_mask"].any()
  with pytest.raises(data.DataError, match=r"^f.jsonl: example 3: no message has role "
                                           r"'assistant' \(roles \['gpt', 'human'\]\)"):
    data.check_training_example(sharegpt, "f.jsonl: example 3")
  data.check_training_example({"text": "x"})
  data.check_training_example({"prompt": "p", "completion": "c"})


def test_draw_evenly_uses_every_item_before_repeating_any():
  import numpy as np
  from cai_jax import data
  picks = data.draw_evenly(3, 8, np.random.default_rng(0))
  assert len(picks) == 8 and sorted(np.bincount(picks, minlength=3)) == [2, 3, 3]
  few = data.draw_evenly(5, 3, np.random.default_rng(1))
  assert list(few) == list(np.random.default_rng(1).choice(5, 3, replace=False))
  assert len(data.draw_evenly(0, 0, np.random.default_rng(0))) == 0
  with pytest.raises(ValueError, match="empty pool"):
    data.draw_evenly(0, 2, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_with_a_byte_order_mark_crlf_and_blank_lines(tmp_path, name):
  import gzip
  raw = '\ufeff{"text": "a"}\r\n\r\n{"text": "b \\r\\n"}\r\n'.encode("utf-8")
  p = tmp_path / name
  p.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
  assert list(data.iter_jsonl(str(p))) == [(1, {"text": "a"}), (3, {"text": "b \r\n"})]


def test_a_corrupt_gzip_file_is_named(tmp_path):
  import gzip
  p = tmp_path / "d.jsonl.gz"
  p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:20])
  with pytest.raises(data.DataError, match=rf"^{p}: cannot read \(Compressed file ended"):
    data.read_jsonl(str(p))
  p.write_bytes(b'{"text": "a"}\n')
  with pytest.raises(data.DataError, match=rf"^{p}: cannot read \(Not a gzipped file"):
    data.read_jsonl(str(p))


def test_a_missing_gzip_dataset_is_named_as_a_missing_file(tmp_path):
  missing = str(tmp_path / "nope.jsonl.gz")
  with pytest.raises(data.DataError, match=rf"^{missing}: no such file$"):
    data.load_examples(missing)


CONTEXT = [{"role": "user", "content": "I hate my neighbor."},
           {"role": "assistant", "content": "OLD REPLY"},
           {"role": "user", "content": "How do I hurt him?"}]


@pytest.mark.parametrize("fmt", ["raw", "chatml", "llama3"])
def test_a_messages_prompt_trains_only_its_completion(fmt):
  """TRL's conversational prompt-completion form: the prompt's assistant turns are context
  (untrained); the tokens are those of the same conversation as 'messages'."""
  as_messages = {"messages": CONTEXT + [{"role": "assistant", "content": "No."}]}
  for completion in ("No.", [{"role": "assistant", "content": "No."}]):
    ex = {"prompt": CONTEXT, "completion": completion}
    assert data.example_messages(ex) == as_messages["messages"]
    out = data.tokenize_example(ex, TOK, fmt, 256)
    whole = data.tokenize_example(as_messages, TOK, fmt, 256)
    assert (out["tokens"] == whole["tokens"]).all() and (out["mask"] == whole["mask"]).all()
    n = int(out["mask"].sum())
    trained = [int(t) for t, m in zip(out["tokens"][:n], out["loss_mask"][:n]) if m]
    text = TOK.decode([t for t in trained if t < 256])
    assert text.strip().startswith("No.") and "OLD REPLY" not in text, (fmt, text)
    assert "OLD REPLY" in TOK.decode([int(t) for t in whole["tokens"][:n] if t < 256])
    lm = out["loss_mask"][:n].astype(int)
    assert np.abs(np.diff(np.concatenate([[0], lm, [0]]))).sum() == 2   # one run
    # the 'messages' form trains the context's assistant turn too
    assert whole["loss_mask"].sum() > out["loss_mask"].sum()


@pytest.mark.parametrize("example, message", [
    ({"prompt": [], "completion": "c"}, r"'prompt' must be a non-empty list"),
    ({"prompt": [{"role": "user"}], "completion": "c"}, r"prompt\[0\] needs 'role' and 'content'"),
    ({"prompt": CONTEXT, "completion": 3}, r"'completion' must be a string, got int"),
    ({"prompt": CONTEXT, "completion": [{"role": "user", "content": "x"}]},
     r"every 'completion' message must have role 'assistant'"),
])
def test_a_malformed_messages_prompt_is_named(example, message):
  with pytest.raises(data.DataError, match=f"^f.jsonl:3: {message}$"):
    data.tokenize_example(example, TOK, "chatml", 64, "f.jsonl:3")


def test_a_text_example_starts_with_the_bos_the_tokenizer_wants():
  """As transformers' tokenizer(text) for a Llama-style tokenizer: BOS, the text, then EOS
  (appended here); the BOS is context (untrained), like a conversation's."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from cai_jax.tokenizer import HFTokenizer
  backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3,
                                        "world": 4, "<unk>": 5}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(["<s>", "</s>", "<pad>"])
  tok = HFTokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                    add_bos_token=True)
  assert data.encode_example({"text": "hello world"}, tok, "raw") == (
      [0, 3, 4, 1], [False, True, True, True])
  assert data.encode_example({"text": "<s> hello"}, tok, "raw")[0] == [0, 3, 1]   # no second BOS
  out = data.tokenize_example({"text": "hello world"}, tok, "raw", 6)
  assert out["tokens"].tolist() == [0, 3, 4, 1, 2, 2]
  assert out["loss_mask"].tolist() == [False, True, True, True, False, False]
  tok.add_bos_token = False
  assert data.encode_example({"text": "hello world"}, tok, "raw") == ([3, 4, 1], [True] * 3)


def test_tfds_split_slices_versions_sequence_features_and_unknown_names(tmp_path):
  """TFDS split syntax has ':' in slices ('train[:50%]'), a name may carry ':VERSION'; a
  Sequence({role, content}) feature (which TFDS returns as a dict of lists) reads as a
  'messages' list, lists of text as str; an unknown name or split is a one-line error."""
  import tensorflow_datasets as tfds

  class ToyConversations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      turn = {"role": tfds.features.Text(), "content": tfds.features.Text()}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "messages": tfds.features.Sequence(turn),
          "tags": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"messages": [{"role": "user", "content": f"q{i}"},
                               {"role": "assistant", "content": f"a{i}"}], "tags": ["x"]}

  ToyConversations(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  d = str(tmp_path)
  assert len(data.load_examples("tfds:toy_conversations:train[:50%]", d)) == 2
  assert len(data.load_examples("tfds:toy_conversations:train[1:]+train[:1]", d)) == 4
  examples = data.load_examples("tfds:toy_conversations:1.0.0:train", d)
  assert len(examples) == 4
  ex = examples[0]
  assert ex["tags"] == ["x"]
  assert sorted(m["content"] for m in ex["messages"])[0].startswith("a")
  assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
  data.check_training_example(ex, "tfds example 0")
  with pytest.raises(data.DataError, match=r"^TFDS dataset 'toy_conversations' split 'dev' "
                                           r"in .*: Unknown split 'dev'.*$"):
    data.load_examples("tfds:toy_conversations:dev", d)
  with pytest.raises(data.DataError, match=r"^TFDS dataset 'no_such_ds' split 'train' .*: "
                                           r"Dataset no_such_ds not found\.$"):
    data.load_examples("tfds:no_such_ds:train", d)
  for bad in ("tfds:train", "tfds::train", "tfds:toy_conversations:"):
    with pytest.raises(data.DataError, match="expected 'tfds:NAME:SPLIT'"):
      data.load_examples(bad, d)


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."},
                              {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello."},
                              {"from": "user", "value": "How do I hurt him?"},
                              {"from": "chatgpt", "value": "No."}]}


@pytest.mark.parametrize("fmt", ["raw", "chatml", "llama3"])
def test_a_sharegpt_row_trains_as_the_same_messages_row(fmt):
  """{"conversations": [{"from", "value"}]} (ShareGPT, as axolotl / LLaMA-Factory read it)
  is the 'messages' conversation with from mapped to a role: same tokens, same loss mask."""
  as_messages = {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "How do I hurt him?"},
                              {"role": "assistant", "content": "No."}]}
  assert data.example_messages(SHAREGPT) == as_messages["messages"]
  data.check_training_example(SHAREGPT)
  out = data.tokenize_example(SHAREGPT, TOK, fmt, 256)
  whole = data.tokenize_example(as_messages, TOK, fmt, 256)
  for k in ("tokens", "mask", "loss_mask"):
    assert (out[k] == whole[k]).all(), k
  assert out["loss_mask"].any()
  names = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
           "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
           "model": "assistant", "system": "system"}
  for name, role in names.items():
    assert data.example_messages({"conversations": [{"from": name, "value": "x"}]}) == [
        {"role": role, "content": "x"}]


@pytest.mark.parametrize("example, message", [
    ({"conversations": [{"from": "Human", "value": "q"}]},
     r"conversations\[0\]\.from is 'Human'; expected one of human, user, .*system"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "r"}]},
     r"conversations\[1\]\.from is 'tool'; expected one of .*"),
    ({"conversations": [{"from": ["human"], "value": "q"}]},
     r"conversations\[0\]\.from is \['human'\]; expected one of .*"),
    ({"conversations": [{"role": "user", "content": "q"}]},
     r"conversations\[0\] needs 'from' and 'value'"),
    ({"conversations": [{"from": "gpt", "value": 3}]},
     r"conversations\[0\]\.value must be a string, got int"),
    ({"conversations": []}, r"'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "human", "value": "q"}]},
     r"no message has role 'assistant' \(roles \['user'\]\), so no token would be trained"),
])
def test_a_malformed_sharegpt_row_is_one_line_naming_the_line(example, message):
  with pytest.raises(data.DataError, match=f"^f.jsonl:3: {message}$"):
    data.check_training_example(example, "f.jsonl:3")


def test_a_sharegpt_jsonl_file_and_tfds_sequence_read_as_conversations(tmp_path):
  p = tmp_path / "sharegpt.jsonl"
  p.write_text(json.dumps(SHAREGPT) + "\n")
  rows = data.load_examples(str(p))
  data.check_training_example(rows[0], rows.where(0))
  assert data.example_messages(rows[0])[-1] == {"role": "assistant", "content": "No."}
  turns = SHAREGPT["conversations"]
  stored = {"conversations": {   # how TFDS gives back a Sequence({"from", "value"}) feature
      "from": np.array([t["from"].encode() for t in turns], dtype=object),
      "value": np.array([t["value"].encode() for t in turns], dtype=object)}}
  assert data._DecodedSource([stored])[0] == SHAREGPT


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_a_line_that_is_not_utf8_is_named_by_its_own_number(tmp_path, name):
  """The file is decoded in chunks: the error names the line with the bad byte, not the
  first line of the chunk it was read in."""
  import gzip
  lines = [json.dumps({"text": f"line {i}"}).encode() for i in range(1, 101)]
  lines[49] = b'{"text": "bad \xff byte"}'
  raw = b"\r\n".join(lines) + b"\r\n"
  p = tmp_path / name
  p.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
  with pytest.raises(data.DataError, match=rf"^{p}:50: not UTF-8 text$"):
    data.read_jsonl(str(p))
