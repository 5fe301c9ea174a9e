"""SteppedGRPO: TRL's GRPO loop advanced a few steps at a time, with snapshots that replay bit-exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl import GRPOConfig

from stso_env.rlhf.bridge import SteppedGRPO, stream_of
from stso_env.rlhf.hf_tokenizer import byte_hf_tokenizer

PROMPTS = [f"The cat {i} " for i in range(16)]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=256, eos_token_id=256, pad_token_id=256))
    model.save_pretrained(path)
    byte_hf_tokenizer().save_pretrained(path)
    return str(path)


def make(policy_dir, tmp_path, seen, max_steps=24, reward=None):
    def count_a(completions, prompts, **kwargs):
        seen.extend(prompts)
        return [float(c.count("a")) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                      max_steps=max_steps, learning_rate=1e-3, beta=0.05, seed=0, save_strategy="no",
                      logging_steps=1, disable_tqdm=True, gradient_checkpointing=False)
    return SteppedGRPO(stream_of(PROMPTS, seed=3), interval=2, model=policy_dir, reward_funcs=reward or count_a,
                       args=args, processing_class=byte_hf_tokenizer())


def params(run):
    return {k: v.detach().clone() for k, v in run.trainer.model.state_dict().items()}


def test_restore_replays_the_same_steps_bit_exactly(policy_dir, tmp_path):
    seen: list[str] = []
    run = make(policy_dir, tmp_path, seen)
    assert run.advance() == 2 and run.advance() == 4
    snap = run.snapshot()
    before = params(run)
    n = len(seen)
    assert run.advance() == 6 and run.advance() == 8
    first, first_prompts = params(run), seen[n:]
    run.restore(snap)
    assert run.step == 4
    run.advance()
    run.advance()
    again, again_prompts = params(run), seen[n + len(first_prompts):]
    assert again_prompts == first_prompts and len(first_prompts) == 4 * 4  # 4 steps x batch 4
    assert max((first[k] - before[k]).abs().max().item() for k in first) > 0  # the steps trained
    assert all(torch.equal(first[k], again[k]) for k in first)
    run.close()


def test_prompts_follow_the_stream_and_the_run_finishes(policy_dir, tmp_path):
    seen: list[str] = []
    run = make(policy_dir, tmp_path, seen, max_steps=6)
    run.start()
    assert run.step == 0 and seen == []  # paused before the first step
    run.advance()
    run.advance()
    assert not run.finished and run.step == 4
    prompt_of = stream_of(PROMPTS, seed=3)
    # each step one batch of 4 rows = 2 groups of 2 generations; group i takes prompt i of the stream
    assert seen[:8] == [p for i in range(4) for p in [prompt_of(i)] * 2]
    assert sorted({prompt_of(i) for i in range(16)}) == sorted(PROMPTS)  # one epoch is a permutation
    assert run.advance() == 6 and run.finished
    with pytest.raises(RuntimeError, match="has finished"):
        run.advance()


def test_a_failing_trainer_raises_in_the_caller(policy_dir, tmp_path):
    def broken(completions, **kwargs):
        raise ValueError("reward model offline")

    run = make(policy_dir, tmp_path, [], reward=broken)
    with pytest.raises(RuntimeError, match="reward model offline"):
        run.advance()
    assert run.finished
    with pytest.raises(ValueError, match="interval"):
        SteppedGRPO(stream_of(PROMPTS, 0), interval=0)
    with pytest.raises(ValueError, match="max_steps"):
        SteppedGRPO(stream_of(PROMPTS, 0), interval=2, args=None)


def test_a_fresh_run_takes_another_runs_snapshot_and_continues_it(policy_dir, tmp_path):
    seen: list[str] = []
    run = make(policy_dir, tmp_path / "a", seen)
    run.advance()
    run.advance()
    snap = run.snapshot()
    run.advance()
    expected = params(run)
    other = make(policy_dir, tmp_path / "b", [])
    other.start()
    other.restore(snap)
    assert other.step == 4 and other.advance() == 6
    got = params(other)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    run.close()
    other.close()
