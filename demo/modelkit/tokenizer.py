"""A character-level tokenizer built locally, saved and loaded like any Hugging Face tokenizer.

One token per character keeps the arithmetic task transparent (one digit = one token, so a reward
can be read off the completion ids) and needs no training data or download.

Decisions:
- BOS: the post-processor prepends `<bos>` whenever special tokens are added (the default of
  `tokenizer(text)`), like Llama's tokenizers. Prompts are therefore encoded as `<bos> 2 3 + 4 8 =`
  by anyone who calls the tokenizer normally, including services that load it with plain
  `AutoTokenizer`. Completions are continuations and must be encoded with
  `add_special_tokens=False`. No EOS is appended by the post-processor: the model emits it.
- Decoder: `decoders.Fuse` concatenates token strings, so `decode(encode(s)) == s` (no spaces
  inserted between characters, spaces in the text are their own token). `clean_up_tokenization_spaces`
  is off so " ," or " ." survive a round trip.
- No normalizer: a character outside the alphabet (an uppercase letter, say) becomes `<unk>`
  rather than being silently rewritten.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
ALPHABET: str = "0123456789+-*= abcdefghijklmnopqrstuvwxyz.,:;?!()/"


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with one token per character of `alphabet`.

    Ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the characters in `alphabet` order, so
    `len(tokenizer) == 4 + len(alphabet)` (54 for the default alphabet).
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters; each character must appear once")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; WordLevel then maps it to its id (or <unk>).
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
