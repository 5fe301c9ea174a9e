"""The project's byte tokenizer as a Hugging Face tokenizer, so TRL can load it from a folder offline.

TRL's trainers take a ``processing_class`` (a transformers tokenizer) and, for a model
given by path, load one with ``AutoTokenizer.from_pretrained``. The policy is trained
on :class:`~stso_env.train.tokenizer.ByteTokenizer` ids (UTF-8 byte ``b`` is id ``b``,
``<|endoftext|>`` is 256), so the Hugging Face tokenizer must give exactly those ids.

It is a ``tokenizers`` BPE model with no merges over GPT-2's byte-to-character
alphabet (each byte one token, id = byte value), a byte-level pre-tokenizer without
regex splitting or prefix space, and ``<|endoftext|>`` as special token 256 serving as
eos, bos, pad and unk. Saved with ``save_pretrained`` it is a plain ``tokenizer.json``
that ``AutoTokenizer`` reads with no network and no custom code.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from stso_env.train.tokenizer import EOT_TEXT, ByteTokenizer


def byte_hf_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer whose ids equal :class:`ByteTokenizer`'s (bytes 0..255, eos 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_tok = ByteTokenizer()
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    vocab[EOT_TEXT] = byte_tok.eos_id
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOT_TEXT, bos_token=EOT_TEXT,
                                  pad_token=EOT_TEXT, unk_token=EOT_TEXT)
    tok.model_max_length = 1 << 30
    return tok
