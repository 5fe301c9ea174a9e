"""RLHF preparation: gold scorer, preference pairs, policy and reward model build, cache, CLI errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from agents.rlhf_prepare import main as cli_main
from stso_env.errors import ConfigError
from stso_env.rlhf.config import RLHFPrepareConfig, load_prepare_config, tiny_config
from stso_env.rlhf.gold import completion_score, gold_score, lexicon_index, sentence_credit
from stso_env.rlhf.hf_tokenizer import byte_hf_tokenizer
from stso_env.rlhf.preferences import SPLITS, build_preferences, corpus_sentences, split_of
from stso_env.rlhf.prepare import MARKER, prepare
from stso_env.train.corpus import _lexicon
from stso_env.train.tokenizer import ByteTokenizer

LEX = _lexicon()
# Hand-built sentences of the grammar: Det Adj* N [PP] V (NP | PP) [Adv] [, Sub/Coord Clause].
SING_SENT = f"{LEX.det_sing[0].capitalize()} {LEX.adjectives[0]} {LEX.noun_sing[0]} {LEX.verb_sing[0]} " \
            f"{LEX.det_plur[1]} {LEX.noun_plur[1]}."
PLUR_SENT = f"{LEX.det_plur[0].capitalize()} {LEX.noun_plur[2]} {LEX.prepositions[0]} {LEX.det_sing[1]} " \
            f"{LEX.noun_sing[3]} {LEX.verb_plur[4]} {LEX.prepositions[1]} {LEX.det_sing[2]} {LEX.noun_sing[5]} " \
            f"{LEX.adverbs[0]}, {LEX.subordinators[0]} {LEX.det_sing[3]} {LEX.noun_sing[6]} {LEX.verb_sing[7]} " \
            f"{LEX.det_sing[4]} {LEX.adjectives[1]} {LEX.adjectives[2]} {LEX.noun_sing[8]}."


# ------------------------------------------------------------------------------------ gold scorer


def test_gold_scores_well_formed_sentences_one():
    assert gold_score(SING_SENT) == 1.0
    assert gold_score(PLUR_SENT) == 1.0
    assert gold_score(SING_SENT + " " + PLUR_SENT) == 1.0
    corpus = corpus_sentences(3, 20_000, stream=5)
    assert len(corpus) > 100 and all(sentence_credit(s) == 1.0 for s in corpus)


def test_gold_penalises_agreement_errors():
    wrong_verb = SING_SENT.replace(LEX.verb_sing[0], LEX.verb_plur[0])
    assert gold_score(wrong_verb) == 0.0
    wrong_det = SING_SENT.replace(f" {LEX.noun_plur[1]}", f" {LEX.noun_sing[1]}")
    assert gold_score(wrong_det) == 0.0
    # One bad clause of two: half credit; one bad sentence of two: the mean.
    second_wrong = PLUR_SENT.replace(LEX.verb_sing[7], LEX.verb_plur[7])
    assert gold_score(second_wrong) == 0.5
    assert gold_score(SING_SENT + " " + wrong_verb) == 0.5


def test_gold_scores_gibberish_and_empty_near_zero():
    rng = random.Random(0)
    junk = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ,.") for _ in range(400))
    assert gold_score(junk) < 0.05
    assert gold_score("") == 0.0 and gold_score("   ") == 0.0
    words = SING_SENT[:-1].split(" ")
    assert gold_score(" ".join(reversed(words)) + ".") == 0.0
    assert gold_score(SING_SENT.replace(LEX.noun_sing[0], "zzqx")) == 0.0


def test_gold_scores_unfinished_text_as_a_prefix():
    # A completion cut by its token budget: full credit while it can still be completed.
    assert gold_score(SING_SENT[:-1]) == 1.0
    assert gold_score(SING_SENT[: len(SING_SENT) // 2]) == 1.0  # possibly inside a word
    assert gold_score(PLUR_SENT.split(",")[0] + ",") == 1.0
    bad = SING_SENT.replace(LEX.verb_sing[0], LEX.verb_plur[0])
    assert gold_score(bad[:-1]) == 0.0
    # completion_score judges the prompt's sentence only
    prompt, rest = SING_SENT.split(" ", 2)[:2], SING_SENT.split(" ", 2)[2]
    assert completion_score(" ".join(prompt), " " + rest + " junk qqq") == 1.0


# ------------------------------------------------------------------------------ preference pairs


def test_preferences_are_deterministic_and_split_disjoint():
    a = build_preferences(11, 150, 30, 40)
    b = build_preferences(11, 150, 30, 40)
    assert a == b
    assert (len(a.train), len(a.probe), len(a.test)) == (150, 30, 40)
    prompts = {s: set(a.prompts(s)) for s in SPLITS}
    assert all(len(prompts[s]) == len(a.split(s)) for s in SPLITS)  # no prompt twice in a split
    assert not prompts["train"] & prompts["probe"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["probe"] & prompts["test"]
    assert all(split_of(p, 11) == s for s in SPLITS for p in prompts[s])
    # More pairs extend the splits without changing the ones already drawn.
    bigger = build_preferences(11, 300, 30, 40)
    assert bigger.train[:150] == a.train and bigger.test == a.test
    other = build_preferences(12, 150, 30, 40)
    assert other.train != a.train


def test_preference_pairs_are_graded_by_the_gold_scorer():
    prefs = build_preferences(5, 300, 0, 60, max_chars=150)
    kinds = {p.corruption for p in prefs.train}
    assert kinds == {"agreement", "shuffle", "foreign"}
    index = lexicon_index()
    for p in prefs.train + prefs.test:
        assert completion_score(p.prompt, p.chosen) == 1.0
        assert completion_score(p.prompt, p.rejected) < 1.0
        assert len(p.prompt + p.chosen) <= 150 and len(p.prompt + p.rejected) <= 150
        assert 2 <= len(p.prompt.split(" ")) <= 4
        if p.corruption == "foreign":
            assert any(w.rstrip(",.") not in index for w in p.rejected.split())
    only_agreement = build_preferences(5, 50, 0, 10, weights=(1.0, 0.0, 0.0))
    assert {p.corruption for p in only_agreement.train} <= {"agreement", "foreign"}  # foreign: fall-back only
    with pytest.raises(ConfigError, match="weights"):
        build_preferences(5, 10, 0, 10, weights=(0.0, 0.0, 0.0))


def test_hf_byte_tokenizer_matches_the_project_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    byte_hf_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = PLUR_SENT + " caf\u00e9, \u00fcber"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tok.eos_token_id == tok.pad_token_id == 256 and len(tok) == 257
    assert tok(text + tok.eos_token)["input_ids"][-1] == 256
    assert tok.decode(tok(text)["input_ids"]) == text


# ------------------------------------------------------------------------------------ config


def test_bad_config_fields_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"reward\.learning_rate: unknown key"):
        load_prepare_config(bad)
    bad.write_text("policy:\n  steps: 0\n")
    with pytest.raises(ConfigError, match=r"policy\.steps: 0 is out of range"):
        load_prepare_config(bad)
    with pytest.raises(ConfigError, match=r"preferences\.max_chars"):
        tiny_config(preferences__max_chars=500)
    with pytest.raises(ConfigError, match=r"evaluation\.n_prompts"):
        tiny_config(evaluation__n_prompts=10_000)
    with pytest.raises(ConfigError, match="prompt_words_max"):
        tiny_config(preferences__prompt_words_min=5)
    good = tmp_path / "good.yaml"
    good.write_text("seed: 4\nreward:\n  epochs: 1.0\n")
    cfg = load_prepare_config(good, size="tiny")
    assert cfg.seed == 4 and cfg.reward.epochs == 1.0 and cfg.policy.steps == tiny_config().policy.steps
    assert load_prepare_config(None) == RLHFPrepareConfig()


def test_cli_bad_config_exits_2_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  lr: fast\n")
    assert cli_main(["--config", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "policy.lr" in err and "expected a number" in err
    with pytest.raises(SystemExit) as exc:  # argparse refuses a size it does not offer
        cli_main(["--size", "huge", "--out", str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 2 and "--size: invalid choice: 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- end to end (tiny)


@pytest.fixture(scope="module")
def prepared(rlhf_tiny):
    return rlhf_tiny  # the session's tiny build (conftest); its summary is the first build's


def test_tiny_prepare_builds_a_loadable_policy_and_a_reward_model_that_beats_chance(prepared):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg, root, summary = prepared
    pol, rm = summary["policy"], summary["reward_model"]
    assert not pol["reused"] and not rm["reused"]
    assert pol["steps"] == cfg.policy.steps and pol["val_loss"] < 2.2  # well below the 2.96-nat unigram
    assert rm["train_pairs"] == cfg.preferences.n_train
    # Measured on one thread: 0.615 on the 200 held-out pairs (chance 0.5, standard error 0.035) and 0.71 on
    # training pairs; a reward model that learned nothing scores about 0.5 on both.
    assert rm["test"]["pairs"] == cfg.preferences.n_test
    assert rm["test_accuracy"] > 0.57
    assert rm["train"]["accuracy"] > 0.6
    gold = summary["policy_gold"]
    assert gold["prompts"] == cfg.evaluation.n_prompts and 0.0 <= gold["mean"] <= 1.0
    assert summary["preferences"] == {**summary["preferences"], "train": 600, "probe": 20, "test": 200}
    # Both folders load offline as TRL would load them.
    tok = AutoTokenizer.from_pretrained(pol["path"], local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(pol["path"], local_files_only=True)
    reward = AutoModelForSequenceClassification.from_pretrained(rm["path"], local_files_only=True)
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tok.pad_token_id == 256
    assert policy.config.vocab_size == 257 == len(tok)
    with torch.no_grad():
        ids = tok([SING_SENT + tok.eos_token], return_tensors="pt")
        assert reward(**ids).logits.shape == (1, 1)
    assert not list(root.glob(".*.tmp"))


def test_second_prepare_reuses_the_cache(prepared):
    cfg, root, first = prepared
    markers = {p: p.stat().st_mtime_ns for p in root.glob(f"*/{MARKER}")}
    assert len(markers) == 2
    again = prepare(cfg, root, progress=False)
    assert again["policy"]["reused"] and again["reward_model"]["reused"]
    assert again["policy"]["path"] == first["policy"]["path"]
    assert again["reward_model"]["test_accuracy"] == first["reward_model"]["test_accuracy"]
    assert again["policy_gold"]["mean"] == first["policy_gold"]["mean"]  # greedy decoding is deterministic
    assert {p: p.stat().st_mtime_ns for p in root.glob(f"*/{MARKER}")} == markers
    # A different reward setting keeps the policy and rebuilds only the reward model's key.
    from stso_env.rlhf.prepare import policy_key, reward_key
    other = tiny_config(reward__lr=5e-4)
    assert policy_key(other) == policy_key(cfg) and reward_key(other) != reward_key(cfg)
    assert policy_key(tiny_config(seed=1)) != policy_key(cfg)


def test_cli_writes_a_summary(prepared, capsys):
    _, root, first = prepared
    assert cli_main(["--size", "tiny", "--out", str(root), "--no-progress"]) == 0
    out = capsys.readouterr()
    summary = json.loads((root / "summary.json").read_text())
    assert json.loads(out.out) == summary
    assert summary["reward_model"]["reused"] and summary["reward_model"]["test_accuracy"] == \
        first["reward_model"]["test_accuracy"]
    assert np.isfinite(summary["seconds"]) and "held-out pair accuracy" in out.err
