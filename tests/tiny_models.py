"""Tiny random checkpoints that the tests write themselves, one per supported architecture.

Every weight is random (norm weights and biases included) so that a mistake in any of them
shows in the logits. The tokenizer is a small byte-level BPE trained here on a fixed text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384
CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)  # torch.Size([3, 4])\n",
    "Speculative decoding drafts tokens and verifies them with the target model in one pass.",
    "| name | value |\n| alpha | 1 |\n| beta | 2 |\n| gamma | 3 |\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 ünïcödé café naïve 日本語 🙂",
]

ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0,
                  tie_word_embeddings=False),
    "llama3_tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                        tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0,
                  tie_word_embeddings=True, head_dim=32),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10000.0,
                    tie_word_embeddings=False, sliding_window=24),
}


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 8, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
    }))


def make_tiny_checkpoint(folder: Path, arch: str, *, seed: int = 0, shard: bool = False) -> Path:
    """Write a random checkpoint of the given architecture key into ``folder``."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    cfg_kwargs = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2,
    )
    cfg_kwargs.update(ARCH_CONFIGS[arch])
    cfg_cls = transformers.AutoConfig.for_model(cfg_kwargs.pop("model_type"), **cfg_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 1.0) / p.shape[-1] ** 0.5 * 2)
    model.save_pretrained(folder, max_shard_size="150KB" if shard else "2GB")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    write_tokenizer(folder)
    return folder


def self_copy_prompts(llm, lengths: list[int], seed: int, copy: int = 20) -> list[list[int]]:
    """Prompts whose greedy continuation copies their own first ``copy`` tokens, for ``llm`` on
    the tiny Mistral (sliding window 24, two layers: tokens more than ~48 positions back cannot
    influence the next token). Q is random; O = greedy(Q); the prompt O[:copy] + Q then continues
    with O again, so an n-gram draft looked up at the start of the prompt is right. Unlike a
    prompt that merely looks repetitive, this holds on every CPU, whatever the kernels' last bits."""
    from quickdraft import SamplingParams

    rng = random.Random(seed)
    bodies = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n - copy)] for n in lengths]
    assert min(len(b) for b in bodies) >= 50
    outs = llm.generate([{"prompt_token_ids": b} for b in bodies],
                        SamplingParams(temperature=0, max_tokens=copy, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids + b for o, b in zip(outs, bodies)]
