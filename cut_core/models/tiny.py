"""A tiny Llama and a tokenizer trained on the spot: a real model for tests and the demo, no hub.

    from cut_core.models.tiny import make_tiny_model
    path = make_tiny_model("work/tiny", texts=my_corpus)      # ~1 s on a laptop core
    model = AutoModelForCausalLM.from_pretrained(path)        # works with HF_HUB_OFFLINE=1
    tok = AutoTokenizer.from_pretrained(path)

The console entry `cut-align make-tiny-model OUT` calls `make_tiny_model(OUT)`.

The tokenizer is a byte-level BPE trained with the `tokenizers` library:
- byte-level, so any text encodes without <unk> and decodes back byte for byte (spaces, tabs,
  newlines included; `clean_up_tokenization_spaces` is off so transformers does not "fix" them);
- digits are split one by one, so numbers share a 10-token vocabulary (the arithmetic demo task
  relies on that instead of on memorised multi-digit merges);
- the template headers and preamble sentences of `templates.py` are single tokens, so a prompt
  costs a few tokens and a small max_length fits;
- special tokens <unk> <s> </s> <pad>; a plain encode adds <s> in front, as Llama's does.
The model is a `LlamaForCausalLM` with random weights (seeded) and untied embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from cut_core.data import templates

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

# Built-in corpus when no texts are given: the prompt layouts, arithmetic in the demo's style,
# and some plain English with punctuation, so frequent words and number patterns get merges.
DEFAULT_CORPUS: tuple[str, ...] = (
    templates.plain_prompt("What is 12 + 7?") + "12 + 7 = 19.",
    templates.judge_prompt("What is 38 - 5?", "The answer is wrong: 38 - 5 is 33, not 32.") + "38 - 5 = 32.",
    templates.plain_prompt("Compute 6 * 9.") + "6 * 9 = 54.",
    templates.judge_prompt("Compute 144 / 12.", "Perfect.") + "144 / 12 = 12.",
    "The response is perfect.",
    "The response is wrong. The correct answer is 42.",
    "The answer has an arithmetic mistake in the last step.",
    "The response is correct but it misses the explanation.",
    "The quick brown fox jumps over the lazy dog.",
    "Below is a short story about a cat who learns to read: every evening, she opens a book.",
    "Write a poem about the sea. The sea is wide, the sea is deep; its waves are slow and its secrets keep.",
    "Explain why the sky is blue. Sunlight is scattered by the air, and blue light is scattered more.",
    "List three fruits:\n1. Apple\n2. Banana\n3. Cherry",
    "Give me a recipe for tea.\n\n- Boil water.\n- Add the tea leaves.\n- Wait three minutes, then pour.",
    "Translate 'hello' into French. The French word is 'bonjour'.",
    "Summarize the paragraph in one sentence, and keep the names of the people in it.",
    "Is 17 a prime number? Yes, 17 is prime because it has no divisors other than 1 and itself.",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Thank you! I hope this helps. Let me know if you have any other questions.",
) + tuple(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 100, 7) for b in range(1, 30, 4))


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, extra_tokens: Iterable[str] = ()):
    """Train the byte-level BPE described in the module docstring; returns a transformers tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first (each digit its own piece), then GPT-2's byte-level split; no prefix space so
    # that decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],          # ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # Whole strings as single tokens; matched in the raw text before pre-tokenization.
    pieces = list(dict.fromkeys([*templates.TEMPLATE_TOKENS, *extra_tokens]))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=None)


def _llama(*, vocab, hidden, inner, layers, heads, positions, special):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
                       tie_word_embeddings=False, **special)


def _gpt2(*, vocab, hidden, inner, layers, heads, positions, special):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=inner, n_layer=layers, n_head=heads,
                      n_positions=positions, **special)


def _gpt_neox(*, vocab, hidden, inner, layers, heads, positions, special):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=positions, tie_word_embeddings=False,
                         **special)


def _phi(*, vocab, hidden, inner, layers, heads, positions, special):
    from transformers import PhiConfig

    return PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                     num_attention_heads=heads, max_position_embeddings=positions, **special)


ARCHITECTURES = {"llama": _llama, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "phi": _phi}


def make_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    extra_tokens: Iterable[str] = (),
    chat_template: str | None = None,
    architecture: str = "llama",
) -> Path:
    """Build a small causal LM (a LlamaForCausalLM by default) + tokenizer in `out_dir` and return the folder.

    texts: the tokenizer's training corpus (default: DEFAULT_CORPUS). vocab_size is the BPE
        target before the template tokens and `extra_tokens` are added; the model's embedding
        covers the final `len(tokenizer)`.
    hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings: the Llama
        config (defaults: ~0.2M parameters).
    seed: torch seed for the random weights.
    extra_tokens: more strings to make single tokens (e.g. a task's fixed phrases).
    chat_template: optional Jinja chat template stored with the tokenizer (none by default, as
        with a plain local tokenizer).
    architecture: one of ARCHITECTURES — 'llama' (untied head, gate/up/down MLP), 'gpt2' (Conv1D
        layers, tied head, learned positions), 'gpt_neox' (fused qkv, dense_h_to_4h MLP), 'phi'
        (fc1/fc2 MLP, head with a bias): the shapes a real user's model may have.
    The folder loads offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir).
    It is built aside and renamed into place whole (cut_core.files.build_dir): `out_dir` never
    holds a config.json without its weights. An existing model folder there is replaced; an
    existing non-empty folder that is not a model is refused (FileExistsError).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from cut_core.files import build_dir

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {sorted(ARCHITECTURES)}")

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} holds files that are not a model: choose an empty or new folder")
    tokenizer = train_tokenizer(DEFAULT_CORPUS if texts is None else texts,
                                vocab_size=vocab_size, extra_tokens=extra_tokens)
    if chat_template is not None:
        tokenizer.chat_template = chat_template

    config = ARCHITECTURES[architecture](
        vocab=len(tokenizer), hidden=hidden_size, inner=intermediate_size, layers=num_layers, heads=num_heads,
        positions=max_position_embeddings,
        special=dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id))
    # Seed only for the weights, restoring the caller's RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    with build_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
