"""model.qk_norm: QK-layernorm on GPT-2's attention (stso_env.train.presets.QKNormConv1D)."""

from __future__ import annotations

import pytest
import torch

from stso_env.config import TrainConfig, apply_overrides
from stso_env.errors import ConfigError
from stso_env.monitor.activations import activation_summary
from stso_env.train.presets import QKNormConv1D, build_model
from stso_env.train.trainer import Trainer
from tests.helpers import tiny_config


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = build_model("tiny", 257)
    torch.manual_seed(0)
    qk = build_model("tiny", 257, qk_norm=True)
    return plain.eval(), qk.eval()


def test_qk_norm_changes_the_model_and_keeps_attention_probabilities():
    plain, qk = _pair()
    sd_plain, sd_qk = plain.state_dict(), qk.state_dict()
    # Patching draws no random numbers: every shared weight has the same init, plus two LayerNorms per block.
    assert sorted(set(sd_qk) - set(sd_plain)) == sorted(
        f"transformer.h.{i}.attn.c_attn.{n}_norm.{w}" for i in range(2) for n in "qk" for w in ("weight", "bias"))
    assert all(torch.equal(sd_plain[k], sd_qk[k]) for k in sd_plain)
    assert all(isinstance(b.attn.c_attn, QKNormConv1D) for b in qk.transformer.h) and qk.config.qk_norm

    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_plain, out_qk = plain(x, output_attentions=True), qk(x, output_attentions=True)
    assert not torch.allclose(out_plain.logits, out_qk.logits)
    assert len(out_qk.attentions) == 2
    for att in out_qk.attentions:  # eager attention still hands back probabilities: causal rows summing to 1
        assert att.shape == (2, 4, 16, 16)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 16))
        assert float(att.triu(1).abs().max()) == 0.0
    rows = activation_summary(qk, x)
    assert len(rows) == 2 and all(0.0 < r["attn_entropy"] <= 1.0 for r in rows)


def test_qk_norm_bounds_the_attention_logits():
    """Why it is the fix for attention-logit growth: growing query/key weights do not sharpen attention."""
    plain, qk = _pair()
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(2))
    d = plain.config.n_embd
    with torch.no_grad():
        before = [m(x, output_attentions=True).attentions[0] for m in (plain, qk)]
        for m in (plain, qk):
            c = m.transformer.h[0].attn.c_attn
            c.weight[:, :2 * d] *= 10.0  # queries and keys x10, values untouched
            c.bias[:2 * d] *= 10.0
        after = [m(x, output_attentions=True).attentions[0] for m in (plain, qk)]
    assert (after[0] - before[0]).abs().max() > 0.1  # plain GPT-2: logits x100, attention much sharper
    torch.testing.assert_close(after[1], before[1], atol=1e-3, rtol=0)  # QK-layernorm: unchanged
    # (up to the LayerNorm's eps: 2e-4 measured)


def test_trainer_with_qk_norm_trains_the_norms_without_weight_decay():
    t = Trainer(tiny_config(model__qk_norm=True))
    norm = t.model.transformer.h[0].attn.c_attn.q_norm.weight
    decayed = {id(p) for p in t.optimizer.param_groups[0]["params"]}
    assert id(norm) not in decayed  # 1-D, like every LayerNorm gain
    start = norm.detach().clone()
    stats = t.train_steps(3)
    assert all(s.loss == s.loss for s in stats) and not torch.equal(norm.detach(), start)
    plain = Trainer(tiny_config())
    assert plain.n_params < t.n_params and plain.config_hash != t.config_hash


def test_qk_norm_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.qk_norm: expected true or false"):
        apply_overrides(TrainConfig(), {"model.qk_norm": "yes"})
    with pytest.raises(ConfigError, match="model.qk_norm: true needs a model trained from scratch.*Unset "
                                          "model.pretrained or set model.qk_norm: false"):
        build_model("tiny", 257, pretrained=str(tmp_path), qk_norm=True)
    torch.manual_seed(0)
    build_model("tiny", 257, qk_norm=True).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="holds a model with QK-layernorm.*continue it from an STSO checkpoint"):
        build_model("tiny", 257, pretrained=str(tmp_path / "m"))
