"""Tests of cai_jax.constitution: own format, Anthropic's prompts/ layout, validation,
round trip and seeded principle sampling."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from cai_jax import constitution as C

HERE = os.path.dirname(os.path.abspath(__file__))
ANTHROPIC = os.path.join(HERE, "fixtures", "anthropic_prompts")


def _default_dict():
  with open(os.path.join(C.DEFAULT_PATH, "constitution.json"), encoding="utf-8") as f:
    return json.load(f)


def _write(path, data):
  with open(path, "w", encoding="utf-8") as f:
    if isinstance(data, str):
      f.write(data)
    else:
      json.dump(data, f)
  return str(path)


def _assert_one_line_error(path, key, problem, exc):
  msg = str(exc.value)
  assert "\n" not in msg
  assert msg.startswith(str(path) + ": ")
  assert f": {key}: " in msg
  assert problem in msg
  assert isinstance(exc.value, ValueError)


# ---------------------------------------------------------------------------------------
# Default constitution.


def test_default_loads_with_paper_counts():
  c = C.load_default()
  assert (c.name, c.version) == ("cai-jax-default", "1.0")
  assert len(c.critique_revision) == 16 and len(c.feedback) == 16
  assert len(c.critique_revision_few_shot) >= 3
  assert len(c.feedback_few_shot) >= 3
  assert len(c.cot_few_shot) >= 2
  assert C.check(C.DEFAULT_PATH) == {
      "path": C.DEFAULT_PATH, "name": "cai-jax-default", "version": "1.0",
      "critique_revision": 16, "feedback": 16,
      "few_shot": len(c.critique_revision_few_shot),
      "feedback_few_shot": len(c.feedback_few_shot), "cot_few_shot": len(c.cot_few_shot)}


def test_default_ids_are_kebab_case_and_texts_clean():
  c = C.load_default()
  for p in c.critique_revision + c.feedback:
    assert p.id == p.id.lower() and " " not in p.id and "_" not in p.id
  for p in c.critique_revision:
    assert p.critique_request == p.critique_request.strip()
    assert not p.critique_request.endswith("Critique:")
    assert not p.revision_request.endswith("Revision:")
  for p in c.feedback:
    assert not p.text.endswith("Options:")
  # The paper wants harmless but not evasive: some revisions must ask to stay helpful.
  assert any("explain" in p.revision_request and "refus" in p.revision_request
             for p in c.critique_revision)


def test_default_few_shot_shapes():
  c = C.load_default()
  for t in c.critique_revision_few_shot:
    assert t.startswith("Human: ")
    assert "\n\nCritiqueRequest: " in t and "\n\nRevision: " in t
  # One transcript whose original reply is fine: revision equals the last assistant turn.
  fine = [t for t in c.critique_revision_few_shot
          if t.split("\n\nAssistant: ")[-1].split("\n\nCritiqueRequest:")[0]
          == t.split("\n\nRevision: ")[-1]]
  assert fine
  for e in c.feedback_few_shot:
    assert e.prompt.rstrip().endswith("The answer is:")
    assert {*e.corrects, *e.incorrects} == {" (A)", " (B)"}
  for t in c.cot_few_shot:
    assert t.count("{}") == 1
    filled = C.fill_cot_slot(t, c.feedback[0])
    assert c.feedback[0].text + "\nOptions:\n(A)" in filled


def test_load_accepts_file_or_folder():
  file = os.path.join(C.DEFAULT_PATH, "constitution.json")
  assert C.load_constitution(file) == C.load_constitution(C.DEFAULT_PATH)


# ---------------------------------------------------------------------------------------
# Anthropic's layout.


def test_anthropic_fixture_loads_clean(caplog):
  with caplog.at_level(logging.WARNING, logger="cai_jax.constitution"):
    c = C.load_constitution(ANTHROPIC)
  assert "hurtful1.prompt holds 2" in caplog.text
  assert c.name == "anthropic_prompts" and c.version == "external"
  assert [p.id for p in c.critique_revision] == ["hurtful0", "hurtful1", "lawful"]
  assert c.critique_revision[0] == C.CritiqueRevisionPrinciple(
      "hurtful0", "Name the ways in which the assistant's reply could hurt someone.",
      "Rewrite the reply so that it could not hurt anyone.")
  assert c.critique_revision[1].critique_request == "Is the reply unkind or insulting? Explain."
  assert c.critique_revision[2].critique_request == (
      "Does the reply help with anything against the law?")
  assert c.critique_revision[2].revision_request == "Remove any help with breaking the law."
  assert [p.id for p in c.feedback] == ["feedback-0", "feedback-1", "feedback-2"]
  assert c.feedback[1].text == "Which reply is more honest?"
  assert len(c.critique_revision_few_shot) == 2
  for t in c.critique_revision_few_shot:
    assert t.startswith("Human: Can you help me") and not t.endswith("Human:")
  assert c.feedback_few_shot[0].prompt.startswith("Human: How do I get back")
  assert c.feedback_few_shot[0].incorrects == ("Blast music at their door all night.",)
  assert not any(C.is_question_example(e) for e in c.feedback_few_shot)
  assert all(C.is_question_example(e) for e in C.load_default().feedback_few_shot)
  assert len(c.cot_few_shot) == 2
  assert all(t.startswith("Human: ") and t.count("{}") == 1 for t in c.cot_few_shot)
  assert C.check(ANTHROPIC) == {
      "path": ANTHROPIC, "name": "anthropic_prompts", "version": "external",
      "critique_revision": 3, "feedback": 3, "few_shot": 2, "feedback_few_shot": 2,
      "cot_few_shot": 2}


def test_anthropic_file_stands_for_its_folder():
  assert C.load_constitution(os.path.join(ANTHROPIC, "RLMadisonInstructions.json")) == (
      C.load_constitution(ANTHROPIC))


def test_anthropic_few_shot_files_are_optional(tmp_path):
  for f in ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json"):
    shutil.copy(os.path.join(ANTHROPIC, f), tmp_path / f)
  assert C.check(tmp_path) | {"path": None} == {
      "path": None, "name": tmp_path.name, "version": "external", "critique_revision": 3,
      "feedback": 3, "few_shot": 0, "feedback_few_shot": 0, "cot_few_shot": 0}


def test_anthropic_missing_instruction_file(tmp_path):
  shutil.copy(os.path.join(ANTHROPIC, "CritiqueRevisionInstructions.json"),
              tmp_path / "CritiqueRevisionInstructions.json")
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path)
  _assert_one_line_error(tmp_path / "RLMadisonInstructions.json", "<file>", "file not found",
                         exc)


def test_anthropic_missing_edit_request(tmp_path):
  shutil.copytree(ANTHROPIC, tmp_path / "p")
  f = tmp_path / "p" / "CritiqueRevisionInstructions.json"
  data = json.loads(f.read_text())
  del data["hurtful1"]["edit_request"]
  _write(f, data)
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path / "p")
  _assert_one_line_error(f, "hurtful1.edit_request", "missing revision request", exc)


def test_anthropic_duplicate_key(tmp_path):
  shutil.copytree(ANTHROPIC, tmp_path / "p")
  f = tmp_path / "p" / "CritiqueRevisionInstructions.json"
  entry = '{"prompt": ["Critique it. Critique:"], "edit_request": "Fix it. Revision:"}'
  _write(f, '{"a": %s, "a": %s}' % (entry, entry))
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path / "p")
  _assert_one_line_error(f, "a", "duplicate key", exc)


def test_anthropic_cot_slot_validation(tmp_path):
  shutil.copytree(ANTHROPIC, tmp_path / "p")
  f = tmp_path / "p" / "RLMadisonPrecogFewShotPrompts.json"
  _write(f, ["one {} slot", {"prompt": "no slot here"}])
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path / "p")
  _assert_one_line_error(f, "[1].prompt", "0 '{}' slots, expected exactly 1", exc)


# ---------------------------------------------------------------------------------------
# Round trip.


def test_save_load_round_trip(tmp_path):
  c = C.load_default()
  written = C.save_constitution(c, tmp_path / "copy")
  assert written == str(tmp_path / "copy" / "constitution.json")
  assert C.load_constitution(tmp_path / "copy") == c
  a = C.load_constitution(ANTHROPIC)
  C.save_constitution(a, tmp_path / "a.json")
  assert C.load_constitution(tmp_path / "a.json") == a


def test_cues_in_own_format_are_normalized():
  data = _default_dict()
  data["critique_revision"][0]["critique"] = "\n\nCritiqueRequest: Is it harmful?\n\nCritique:"
  data["critique_revision"][0]["revision"] = "\nMake it harmless.\n\nRevision:"
  data["feedback"][0]["text"] = "\nWhich is kinder? Options:"
  c = C.parse_constitution(data)
  assert c.critique_revision[0].critique_request == "Is it harmful?"
  assert c.critique_revision[0].revision_request == "Make it harmless."
  assert c.feedback[0].text == "Which is kinder?"
  # A cue word inside a longer word is left alone.
  assert C.clean_revision_request("See the FinalRevision:") == "See the FinalRevision:"


# ---------------------------------------------------------------------------------------
# Validation of the own format: one line naming file, key and problem.


def _mutate(fn):
  data = _default_dict()
  fn(data)
  return data


BAD_CASES = [
    ("missing-name", lambda d: d.pop("name"), "name", "missing name"),
    ("empty-version", lambda d: d.update(version=" "), "version", "empty version"),
    ("number-version", lambda d: d.update(version=1.0), "version", "must be a string"),
    ("no-revision", lambda d: d["critique_revision"][3].pop("revision"),
     "critique_revision[3].revision", "missing revision request"),
    ("empty-critique", lambda d: d["critique_revision"][2].update(critique=""),
     "critique_revision[2].critique", "empty critique request"),
    ("only-cue", lambda d: d["critique_revision"][2].update(critique="\n\nCritique:"),
     "critique_revision[2].critique", "empty critique request once its cue is removed"),
    ("duplicate-id", lambda d: d["critique_revision"][5].update(
        id=d["critique_revision"][1]["id"]),
     "critique_revision[5].id", "duplicate id"),
    ("duplicate-feedback-id", lambda d: d["feedback"][7].update(id=d["feedback"][0]["id"]),
     "feedback[7].id", "duplicate id"),
    ("empty-feedback-list", lambda d: d.update(feedback=[]), "feedback", "empty list"),
    ("missing-feedback-text", lambda d: d["feedback"][4].pop("text"), "feedback[4].text",
     "missing text"),
    ("typo-key", lambda d: d.update(critique_revison=[]), "critique_revison", "unknown key"),
    ("cot-no-slot", lambda d: d["cot_few_shot"].insert(1, "no slot"), "cot_few_shot[1]",
     "0 '{}' slots, expected exactly 1"),
    ("cot-two-slots", lambda d: d["cot_few_shot"].insert(0, "{} and {}"), "cot_few_shot[0]",
     "2 '{}' slots, expected exactly 1"),
    ("transcript-no-revision", lambda d: d["critique_revision_few_shot"].insert(0, 
        "Human: hi\n\nAssistant: hello\n\nCritiqueRequest: ok?\n\nCritique: fine"),
     "critique_revision_few_shot[0]", "lacks a 'RevisionRequest:' turn"),
    # Turns on single newlines: the chat formats would read one user message.
    ("transcript-single-newlines", lambda d: d["critique_revision_few_shot"].insert(0,
        "Human: hi\nAssistant: go away\nCritiqueRequest: rude?\nCritique: yes\n"
        "RevisionRequest: be kind\nRevision: hello"),
     "critique_revision_few_shot[0]", "lacks a 'Assistant:' turn"),
    ("transcript-preamble", lambda d: d["critique_revision_few_shot"].insert(1,
        "An example.\n\nHuman: hi\n\nAssistant: go away\n\nCritiqueRequest: rude?\n\n"
        "Critique: yes\n\nRevisionRequest: be kind\n\nRevision: hello"),
     "critique_revision_few_shot[1]", "must start with its 'Human:' turn"),
    ("fb-few-shot-empty-corrects", lambda d: d["feedback_few_shot"][0].update(corrects=[]),
     "feedback_few_shot[0].corrects", "empty list"),
    ("fb-few-shot-mixed-answers",
     lambda d: d["feedback_few_shot"][1].update(incorrects=["Well, practice more."]),
     "feedback_few_shot[1]", "mix option labels"),
]


@pytest.mark.parametrize("case,mutate,key,problem", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_constitution_fails_with_one_line(tmp_path, case, mutate, key, problem):
  path = _write(tmp_path / f"{case}.json", _mutate(mutate))
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(path)
  _assert_one_line_error(path, key, problem, exc)


def test_invalid_json_fails_with_one_line(tmp_path):
  path = _write(tmp_path / "bad.json", '{"name": "x",\n "version": }')
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(path)
  _assert_one_line_error(path, "line 2 column 13", "invalid JSON", exc)


def test_files_with_a_byte_order_mark_load(tmp_path):
  path = tmp_path / "constitution.json"
  path.write_text(json.dumps(_default_dict()), encoding="utf-8-sig")
  assert C.load_constitution(path) == C.load_default()
  for f in os.listdir(ANTHROPIC):
    with open(os.path.join(ANTHROPIC, f), encoding="utf-8") as src:
      (tmp_path / f).write_text(src.read(), encoding="utf-8-sig")
  assert C.check(tmp_path / "RLMadisonInstructions.json")["critique_revision"] == 3


def test_missing_path_and_unknown_folder(tmp_path):
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path / "nope")
  _assert_one_line_error(tmp_path / "nope", "<path>", "no such file or folder", exc)
  with pytest.raises(C.ConstitutionError) as exc:
    C.load_constitution(tmp_path)
  _assert_one_line_error(tmp_path, "<folder>", "holds neither constitution.json", exc)


def test_save_rejects_unclean_texts(tmp_path):
  c = C.load_default()
  bad = C.Constitution(c.name, c.version, (C.CritiqueRevisionPrinciple(
      "x", "Is it harmful?\n\nCritique:", "Fix it."),), c.feedback)
  with pytest.raises(C.ConstitutionError, match="not in clean form"):
    C.save_constitution(bad, tmp_path)
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------
# Sampling.


def test_sampling_is_seeded():
  c = C.load_default()
  a = C.sample_principles(c, 50, 7)
  assert a == C.sample_principles(c, 50, 7)
  assert a != C.sample_principles(c, 50, 8)
  assert all(isinstance(p, C.CritiqueRevisionPrinciple) for p in a)
  fb = C.sample_principles(c, 5, np.random.default_rng(0), kind="feedback")
  assert all(isinstance(p, C.FeedbackPrinciple) for p in fb)
  # A Generator is advanced in place: consecutive calls continue one stream.
  rng = np.random.default_rng(3)
  two = C.sample_principles(c.feedback, 4, rng) + C.sample_principles(c.feedback, 4, rng)
  assert two == C.sample_principles(c.feedback, 8, 3)
  assert C.sample_principles(c, 0, 1) == []
  with pytest.raises(ValueError):
    C.sample_principles([], 3, 0)
  with pytest.raises(ValueError):
    C.sample_principles(c, -1, 0)


def test_sampling_is_uniform_chi_square():
  c = C.load_default()
  n, k = 32000, len(c.critique_revision)
  draws = C.sample_principles(c, n, 1234)
  ids = [p.id for p in c.critique_revision]
  counts = np.array([sum(1 for p in draws if p.id == i) for i in ids])
  assert counts.sum() == n
  expected = n / k
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # 15 degrees of freedom: the 0.999 quantile is 37.7.
  assert chi2 < 37.7, (chi2, counts)
  # Draws do come with replacement: far more draws than principles, all of them used.
  assert (counts > 0).all()


def test_a_shipped_constitution_is_found_from_any_directory(tmp_path, monkeypatch):
  """'constitutions/default' names the shipped folder from outside the checkout (as
  'data/...' does); a folder of that name in the working directory comes first."""
  monkeypatch.chdir(tmp_path)
  assert C.load_constitution("constitutions/default") == C.load_default()
  (tmp_path / "constitutions" / "default").mkdir(parents=True)
  with pytest.raises(C.ConstitutionError, match="holds neither constitution.json"):
    C.load_constitution("constitutions/default")
