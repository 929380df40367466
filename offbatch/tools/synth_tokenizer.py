"""A small byte-level BPE tokenizer for synthetic models, trained here in well under a second.

Synthetic model folders need a real tokenizer (tokenizer.json that `tokenizers` and transformers'
AutoTokenizer load, special tokens, a chat template) but nothing may be downloaded, so we train one
on the embedded corpus below. Byte-level BPE can encode any text, so prompts in tests never hit an
unknown token. Special tokens sit at fixed ids 0..3 whatever the vocabulary size, so the ids in
config.json / generation_config.json do not depend on the training result.
"""

from __future__ import annotations

import functools
import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = ENDOFTEXT, IM_END, PAD

MAX_TOKENIZER_VOCAB = 4096
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens

# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as Qwen and many others use; `add_generation_prompt` opens the assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Varied English with digits, punctuation, code and markup, so merges look like a real tokenizer's.
CORPUS = r"""
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.

Once upon a time, in a small village at the edge of a great forest, there lived an old woman who
kept bees. Every morning she walked to the hives, lifted the lids, and listened to the humming. "They
tell me what the weather will be," she said to the children who followed her. "When they are calm,
the day will be fair. When they are angry, a storm is coming." The children laughed, but they
noticed that she was never wrong. In the autumn she sold honey at the market: 12 jars on Monday,
17 on Wednesday and 23 on Saturday, at 4.50 each. By the end of October she had earned enough to
repair the roof of her cottage, buy a new coat, and still give a jar to every family on her street.

Photosynthesis is the process by which green plants, algae and some bacteria convert light energy
into chemical energy. In the chloroplasts, water is split into oxygen, protons and electrons; the
energy of sunlight is stored in ATP and NADPH, which then drive the fixation of carbon dioxide into
sugars in the Calvin cycle. Roughly 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. About 90% of the oxygen in the
atmosphere was produced this way over billions of years.

The history of computing is a history of abstraction. Early machines were programmed by rewiring
panels; then came stored programs, assembly language, compilers, operating systems, and networks.
Each layer hid the details of the one below it, so that people could think about larger problems.
Today a single phone holds more memory than all the computers of 1970 together, and a data center
may contain hundreds of thousands of processors working on one task.

Q: What is the capital of France?
A: The capital of France is Paris.
Q: How many days are there in a leap year?
A: There are 366 days in a leap year; February has 29 days instead of 28.
Q: Can you explain what a prime number is?
A: A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as
2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31 and 37.

Dear Ms. Thompson,
Thank you for your letter of March 3rd. I am pleased to confirm your reservation for two nights,
from Friday, 14 June to Sunday, 16 June, in a double room with a view of the harbour. Breakfast is
served from 7:00 to 10:30 a.m. Please let us know if you need a parking space or a late check-out.
Kind regards, the Front Desk Team.

Recipe for a simple bread: mix 500 g of flour, 10 g of salt, 7 g of dried yeast and 350 ml of warm
water. Knead for ten minutes until the dough is smooth and elastic. Leave it to rise for one hour,
shape it into a loaf, let it rise again for 45 minutes, then bake at 220 C (about 430 F) for 30 to
35 minutes. The bread is done when it sounds hollow when tapped on the bottom.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

{"id": "req-001", "prompt": "Summarize the following text.", "max_tokens": 128, "temperature": 0.7}
{"id": "req-002", "messages": [{"role": "user", "content": "Hello! How are you?"}], "stop": ["\n\n"]}

<html><body><h1>Welcome</h1><p>This page is <b>under construction</b>. Come back soon &amp; enjoy.</p></body></html>

SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id
WHERE orders.created_at >= '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;

The mountains rose steeply from the valley floor, their peaks hidden in cloud. A narrow path wound
between the rocks, and every few hundred metres a small stone shelter offered rest to travellers.
It took us three days to reach the pass at 2,850 metres. On the last morning the sky cleared, and we
could see the glacier shining below us, the lakes like scattered coins, and far away, the sea.

In mathematics, a function f is continuous at a point x if small changes in x produce small changes
in f(x). More precisely, for every e > 0 there is a d > 0 such that |f(y) - f(x)| < e whenever
|y - x| < d. The sum 1 + 2 + 3 + ... + n equals n(n + 1)/2, and the series 1/1 + 1/4 + 1/9 + ...
converges to pi^2/6, approximately 1.6449.

Economics studies how people, firms and governments allocate scarce resources. When the price of a
good rises, buyers usually want less of it and sellers want to supply more; the market price is
where the two meet. Inflation of 2-3% a year is often considered healthy, while rates above 10% can
erode savings quickly. In 2023, global trade was worth roughly $31 trillion.

She opened the window and the noise of the city came in: car horns, a bus braking, someone singing
in the street below, a dog barking twice and then falling silent. It was already half past eight.
"We're going to be late," he called from the hallway. "I know, I know!" she answered, grabbing her
keys, her phone and the umbrella - just in case - before running down the stairs.

Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April,
May, June, July, August, September, October, November, December. Spring, summer, autumn, winter.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, hundred, thousand.
0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 2048 4096 65536 3.14159 2.71828 -1 +7 1e-5 0.001 99.9%

Good morning! Good afternoon. Good evening... Goodbye? Please, thank you, sorry, excuse me.
Is it (really) true? Yes; no: maybe - perhaps [see note 3], {braces}, <angles>, "quotes", 'single'.
Email: support@example.com; web: https://example.com/docs/index.html?page=2#section-4; path: /usr/local/bin
Tabs	and	spaces   and new
lines.

The committee met on 5 May to review the proposal. After a long discussion, the members agreed
that the project should continue, subject to three conditions: first, that the budget be reduced
by 15 percent; second, that a progress report be submitted every quarter; and third, that an
independent expert evaluate the results before any further funding is approved.

Large language models are trained to predict the next token in a sequence. Given enough data and
parameters, they learn grammar, facts, and some forms of reasoning. At inference time the model
produces one token after another; each new token depends on all the previous ones, which is why
the keys and values of earlier tokens are kept in a cache instead of being computed again.
"""


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    # Qwen2's pipeline exactly: transformers 5 rebuilds it for model_type qwen2 whatever
    # tokenizer_config.json says, so any other pipeline would tokenize differently there.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    assert all(tok.token_to_id(t) == i for t, i in SPECIAL_IDS.items())
    return tok.to_str()


def train_tokenizer(model_vocab_size: int, add_bos: bool = False) -> Tokenizer:
    """A byte-level BPE of at most min(model_vocab_size, MAX_TOKENIZER_VOCAB) tokens.

    Training is cached per size (a few hundred ms the first time); each call returns a fresh object.
    `add_bos` prepends BOS_TOKEN on encode, as Llama and OPT tokenizers do.
    """
    if model_vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {model_vocab_size} is too small: the tokenizer needs at least {MIN_VOCAB}")
    tok = Tokenizer.from_str(_trained_json(min(model_vocab_size, MAX_TOKENIZER_VOCAB)))
    if add_bos:
        bos = (BOS_TOKEN, SPECIAL_IDS[BOS_TOKEN])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[bos]
        )
    return tok


def tokenizer_files(model_vocab_size: int, model_max_length: int, add_bos: bool = False) -> dict[str, str]:
    """File name -> text for tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    tok = train_tokenizer(model_vocab_size, add_bos=add_bos)
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in SPECIAL_IDS.items()
    }
    config = {
        # The generic fast class loads tokenizer.json as it is, in transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHATML_TEMPLATE,
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "chat_template.jinja": CHATML_TEMPLATE,
    }
