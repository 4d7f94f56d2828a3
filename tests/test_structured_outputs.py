"""Structured outputs: every output obeys its constraint (jsonschema, choice, regex) on tiny random
models (which never produce valid JSON by chance) and on SmolLM2, with both grammar backends and
every speculation method; greedy and seeded output are token-identical with and without
speculation, alone and batched; the law of a `choice` output equals the masked target law
computed independently (transformers logits + our own mask from the choice strings)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import jsonschema
import pytest
import torch
import transformers

from quickdraft import LLM, SamplingParams
from quickdraft.sampling_params import StructuredOutputsParams
from stats import chi_square_pvalue, powered_sample_size

TINY_KW = dict(dtype="float32", device="cpu", max_model_len=256)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},  # (xgrammar 0.2.9 lets maxLength strings hold raw control characters)
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,4}-\d{2}"
CHOICES = ["yes", "no", "maybe later"]
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "| name | value |\n| alpha |", "Numbers: 0 1 2 3"]
METHODS = {
    "plain": None,
    "grammar": {"method": "grammar", "num_speculative_tokens": 8},
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
              "draft_length_policy": "fixed"},
    "suffix": {"method": "suffix", "num_speculative_tokens": 8, "draft_length_policy": "fixed"},
}


def constraint(kind: str, compact: bool = True) -> StructuredOutputsParams:
    if kind == "json":
        return StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=compact)
    if kind == "regex":
        return StructuredOutputsParams(regex=REGEX)
    return StructuredOutputsParams(choice=CHOICES)


def check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


# ---- the parameters ------------------------------------------------------------------------------
def test_exactly_one_constraint_and_errors_name_the_problem():
    with pytest.raises(ValueError, match="exactly one .* got json, regex"):
        StructuredOutputsParams(json=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="unknown field.*jsn"):
        SamplingParams(structured_outputs={"jsn": {}})
    p = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert p.structured_outputs.choice == ["a", "b"] and p.structured_outputs.kind == "choice"


def test_bitmask_masks_exactly_the_disallowed_tokens():
    """Bit t % 32 of word t // 32 allows token t (the backends' layout); checked bit by bit."""
    from quickdraft.structured_output.bitmask import apply_bitmask, unpack_bitmask

    g = torch.Generator().manual_seed(0)
    vocab = 100
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    want = [[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)] for r in range(3)]
    assert unpack_bitmask(bitmask, vocab).tolist() == want
    logits = torch.randn(5, vocab, generator=g)
    before = logits.clone()
    apply_bitmask(logits, bitmask[:2], [4, 1])
    for r, row in ((4, 0), (1, 1)):
        assert all((logits[r, t] == before[r, t]) if want[row][t] else logits[r, t] == float("-inf")
                   for t in range(vocab))
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])


@pytest.fixture(scope="module")
def tiny_engines(tiny_checkpoint):
    cache: dict[tuple[str, str], LLM] = {}

    def get(method: str, backend: str = "auto") -> LLM:
        if (method, backend) not in cache:
            spec = METHODS.get(method)
            if method == "draft_model":
                spec = {"model": str(tiny_checkpoint("llama")), "num_speculative_tokens": 4,
                        "draft_length_policy": "fixed"}
            cache[method, backend] = LLM(str(tiny_checkpoint("llama")), speculative_config=spec,
                                         structured_outputs_backend=backend, **TINY_KW)
        return cache[method, backend]

    return get


def test_a_grammar_that_does_not_compile_is_a_clear_error_and_disturbs_nothing(tiny_engines):
    llm = tiny_engines("plain")
    with pytest.raises(ValueError, match="structured_outputs.json"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, structured_outputs={"json": {"type": "nonsense"}}))
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, structured_outputs={"regex": "(unclosed"}))
    with pytest.raises(ValueError, match="structured_outputs_backend must be one of"):
        LLM(structured_outputs_backend="outlines")
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


# ---- every output obeys its constraint --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
@pytest.mark.parametrize("method", ["plain", "grammar", "ngram", "suffix", "draft_model"])
def test_tiny_random_model_outputs_obey_the_constraint(tiny_engines, method, backend):
    """A random model would never write valid JSON: every output here must come from the mask.
    Greedy and sampled (4 seeds), every kind; speculation must actually happen."""
    llm = tiny_engines(method, backend)
    for kind in ("json", "regex", "choice"):
        params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=constraint(kind))]
        params += [SamplingParams(temperature=1.0, seed=s, max_tokens=120, structured_outputs=constraint(kind))
                   for s in range(4)]
        prompts = [PROMPTS[0]] + PROMPTS[:4]
        for out in llm.generate(prompts, params, use_tqdm=False):
            o = out.outputs[0]
            assert o.finish_reason == "stop", (kind, o.text)
            check(kind, o.text)
    if method != "plain":
        s = llm.engine.spec_stats
        assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0
        # Fixed JSON punctuation and the rest of a choice are forced: drafted by every method.
        m = {x.name: x.value for x in llm.get_metrics() if x.name.startswith("quickdraft:spec_decode_grammar_")}
        assert m["quickdraft:spec_decode_grammar_num_drafts"] > 0
        assert m["quickdraft:spec_decode_grammar_num_accepted_tokens"] > 0


@pytest.mark.parametrize("method", ["grammar", "ngram", "suffix", "draft_model"])
def test_speculation_leaves_constrained_outputs_unchanged_alone_and_batched(tiny_engines, method):
    """Greedy and seeded constrained output with speculation == without, token for token, each
    request alone and all at once."""
    plain, spec = tiny_engines("plain"), tiny_engines(method)
    params = []
    for kind in ("json", "regex", "choice"):
        params.append(SamplingParams(temperature=0, max_tokens=120, structured_outputs=constraint(kind, compact=False)))
        params.append(SamplingParams(temperature=0.9, seed=7, max_tokens=120, structured_outputs=constraint(kind)))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    alone = [spec.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    batched = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert alone == want and batched == want
    s = spec.engine.spec_stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0


def test_smollm2_json_schema_greedy_and_sampled_with_and_without_speculation(smollm2_quantized, smollm2_gguf):
    """The real model: extraction under a schema (whitespace as by default) validates;
    with ngram and with suffix decoding the text is identical to plain constrained decoding."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    msgs = [[{"role": "user", "content": f"Extract name, age and city as JSON: {r}"}]
            for r in ("Alice Smith (34) lives in Lisbon.", "Bruno Okafor, 51, moved to Osaka.")]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.8, seed=3, max_tokens=80,
                             structured_outputs=StructuredOutputsParams(json=schema))]
    cases = [(m, p) for m in msgs for p in params]
    want = [smollm2_quantized.chat([m], p, use_tqdm=False)[0].outputs[0] for m, p in cases]
    for o in want:
        jsonschema.validate(json.loads(o.text), schema)
    assert json.loads(want[0].text)["age"] == 34
    for spec in ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                  "draft_length_policy": "fixed"},
                 {"method": "suffix", "num_speculative_tokens": 16, "draft_length_policy": "fixed"}):
        llm = LLM(str(smollm2_gguf), device="cpu", max_model_len=2048, speculative_config=spec)
        got = [o.outputs[0].token_ids for o in llm.chat([m for m, _ in cases], [p for _, p in cases], use_tqdm=False)]
        assert got == [o.token_ids for o in want]
        s = llm.engine.spec_stats
        assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0


# ---- the law under a choice constraint --------------------------------------------------------------
def test_choice_law_equals_the_masked_target_law(tiny_engines, tiny_checkpoint):
    """P(output = c) for each choice c, computed independently: every token path that spells a
    choice (our own mask: tokens whose text extends the prefix towards some choice; EOS where the
    prefix is a choice), each step's probability from transformers' logits renormalised over the
    allowed tokens. Sampled with grammar drafts (the rest of "maybe later" is forced after "m"):
    chi-square at alpha = 0.001 with 80% power against the law's own shape."""
    llm = tiny_engines("grammar")
    tok = llm.get_tokenizer()
    eos = sorted(llm.engine.eos_token_ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint("llama")), torch_dtype=torch.float32)
    prompt = tok.encode(PROMPTS[1])
    texts = {t: tok.decode([t]) for t in range(tok.vocab_size) if t not in eos}

    @lru_cache(maxsize=None)
    def law(path: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(path)])).logits[0, -1].float()
        return logits

    totals = {c: 0.0 for c in CHOICES}

    def walk(path: tuple[int, ...], text: str, prob: float) -> None:
        allowed = [t for t, s in texts.items() if s and any(c.startswith(text + s) for c in CHOICES)]
        ends = eos if text in CHOICES else []
        logits = law(path)
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed + ends] = 0.0
        p = (logits + mask).softmax(-1)
        if ends:
            totals[text] += prob * float(p[ends].sum())
        for t in allowed:
            walk(path + (t,), text + texts[t], prob * float(p[t]))

    walk((), "", 1.0)
    expected = torch.tensor([totals[c] for c in CHOICES], dtype=torch.float64)
    assert abs(float(expected.sum()) - 1.0) < 1e-6
    n = max(powered_sample_size(expected, 1e-3), 300)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=16,
                             structured_outputs=StructuredOutputsParams(choice=CHOICES)) for i in range(n)]
    before = llm.engine.spec_stats.num_accepted_tokens
    outs = llm.generate([PROMPTS[1]] * n, params, use_tqdm=False)
    counts = torch.tensor([sum(o.outputs[0].text == c for o in outs) for c in CHOICES], dtype=torch.float64)
    assert counts.sum() == n
    assert llm.engine.spec_stats.num_accepted_tokens > before
    assert chi_square_pvalue(counts, expected) > 1e-3, (counts.tolist(), (expected * n).tolist())


def test_compiled_once_per_distinct_constraint(tiny_engines):
    llm = tiny_engines("plain", "xgrammar")
    mgr = llm.engine.structured
    before = mgr.num_compiled
    sp = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex="[ab]{3}x"))
    llm.generate(PROMPTS, sp, use_tqdm=False)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40,
                                         structured_outputs=StructuredOutputsParams(regex="[ab]{3}x")), use_tqdm=False)
    assert mgr.num_compiled == before + 1


# ---- the server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def so_server(smollm2_gguf):
    from test_server import Server

    s = Server(LLM(str(smollm2_gguf), device="cpu", max_model_len=2048, speculative_config=METHODS["ngram"]), ["smol"])
    yield s
    s.close()


def test_server_json_schema_parse_streaming_choice_and_bad_schema(so_server, smollm2_quantized):
    """Through the official client on SmolLM2: response_format json_schema (plain and streamed)
    validates, parse() fills a pydantic model, json_object gives an object, extra_body
    structured_outputs works on /v1/completions, bad constraints are 400s naming the problem, and
    an unconstrained stream running meanwhile gets exactly its offline text; no KV block is left
    in use."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int
        city: str

    schema = Person.model_json_schema()
    client = so_server.client()
    msgs = [{"role": "user", "content": "Extract name, age and city as JSON: Alice Smith (34) lives in Lisbon."}]
    rf = {"type": "json_schema", "json_schema": {"name": "Person", "schema": schema, "strict": True}}
    want_free = smollm2_quantized.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
                                           use_tqdm=False)[0].outputs[0].text

    def free_stream() -> str:
        chunks = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=48, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(1) as pool:
        free = pool.submit(free_stream)
        r = client.chat.completions.create(model="smol", messages=msgs, response_format=rf, max_tokens=100,
                                           temperature=0)
        assert json.loads(r.choices[0].message.content) == {"name": "Alice Smith", "age": 34, "city": "Lisbon"}
        parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
        parsed = parse(model="smol", messages=msgs, response_format=Person, max_tokens=100, temperature=0.7, seed=1)
        assert isinstance(parsed.choices[0].message.parsed, Person)
        stream = client.chat.completions.create(model="smol", messages=msgs, response_format=rf, max_tokens=100,
                                                temperature=0.9, seed=5, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), schema)
        obj = client.chat.completions.create(model="smol", messages=msgs, max_tokens=100, temperature=0,
                                             response_format={"type": "json_object"})
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
        c = client.completions.create(model="smol", prompt="Is the sky blue? Answer:", max_tokens=8, temperature=0.7,
                                      seed=2, extra_body={"structured_outputs": {"choice": CHOICES}})
        assert c.choices[0].text in CHOICES
        with pytest.raises(openai.BadRequestError, match="structured_outputs.json"):
            client.chat.completions.create(model="smol", messages=msgs, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
        with pytest.raises(openai.BadRequestError, match="response_format type must be"):
            client.chat.completions.create(model="smol", messages=msgs, max_tokens=8, response_format={"type": "xml"})
        with pytest.raises(openai.BadRequestError, match="exactly one"):
            client.completions.create(model="smol", prompt="x", max_tokens=8,
                                      extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
        assert free.result() == want_free
    assert so_server.kv_free()


# ---- grammars in GBNF, JSON that finishes -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_gbnf_grammars_on_both_backends(tiny_engines, backend):
    """An EBNF (GBNF, ``::=``) grammar and its Lark twin give outputs in the language, greedy
    and sampled; the guidance backend translates GBNF to Lark."""
    llm = tiny_engines("plain", backend)
    for grammar in ('root ::= "yes" | "no" | "maybe" [0-9]', 'start: "yes" | "no" | "maybe" /[0-9]/'):
        params = [SamplingParams(temperature=t, seed=s, max_tokens=8,
                                 structured_outputs=StructuredOutputsParams(grammar=grammar))
                  for t, s in ((0, None), (1.0, 1), (1.0, 2), (1.0, 3))]
        for out in llm.generate(PROMPTS, params, use_tqdm=False):
            assert out.error is None and re.fullmatch(r"yes|no|maybe[0-9]", out.outputs[0].text), out.outputs[0].text


def grammar_accepts(llm: LLM, so: StructuredOutputsParams, text: str) -> bool:
    """Whether the constraint's grammar takes ``text`` followed by EOS (token by token)."""
    g = llm.engine.structured.grammar_for(so)
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False) + [min(llm.engine.eos_token_ids)]
    return g.validate_tokens(ids) == len(ids)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_json_whitespace_is_bounded_by_default_and_free_on_request(tiny_engines, backend):
    """By default the whitespace between JSON tokens is nothing, one space, or a newline and at
    most 20 spaces/tabs (llama.cpp's rule): pretty-printing passes, runs of newlines and deeper
    indents do not. ``max_indent=None`` takes any whitespace (vLLM's default);
    ``disable_any_whitespace`` none. Unbounded integers are read as |x| <= 2**53 - 1; a
    schema's own bounds are kept."""
    llm = tiny_engines("plain", backend)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {
        "type": "object", "properties": {"c": {"type": "integer", "maximum": 5}}, "required": ["c"],
        "additionalProperties": False}}}, "required": ["a", "b"], "additionalProperties": False}
    bounded = StructuredOutputsParams(json=schema)
    free = StructuredOutputsParams(json=schema, max_indent=None)
    compact = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    pretty = json.dumps({"a": 1, "b": [{"c": 2}, {"c": 3}]}, indent=2)
    tabs = '{\n\t"a": 1,\n\t"b": [\n\t\t{"c": 2}\n\t]\n}'
    for text, by_default in (
            ('{"a":1,"b":[]}', True),
            ('{"a": 1, "b": [ {"c": 2} ]}', True),
            (pretty, True),
            (tabs, True),
            ('{\n\n"a": 1, "b": []}', False),  # two newlines in a row
            ('{  "a": 1, "b": []}', False),  # two spaces without a newline
            ('{\n' + ' ' * 20 + '"a": 1, "b": []}', True),
            ('{\n' + ' ' * 21 + '"a": 1, "b": []}', False)):
        assert grammar_accepts(llm, bounded, text) == by_default, (text, "default")
        assert grammar_accepts(llm, free, text), (text, "free")
    assert not grammar_accepts(llm, compact, pretty) and not grammar_accepts(llm, compact, tabs)
    assert not grammar_accepts(llm, bounded, '{"a": 1, "b": []}\n\n\n')
    assert grammar_accepts(llm, bounded, '{"a": -9007199254740991, "b": []}')  # -(2**53 - 1)
    assert not grammar_accepts(llm, bounded, '{"a": 9007199254740992, "b": []}')
    assert not grammar_accepts(llm, bounded, '{"a": 1, "b": [{"c": 6}]}')  # the schema's maximum
    assert grammar_accepts(llm, StructuredOutputsParams(json={"type": "integer", "minimum": 0, "maximum": 10**18}),
                           "100000000000000000")  # 18 digits: the schema's own bound
    # Bounds follow the schema's keywords: a property named "default" is a schema like any other;
    # a bound with the digits of the rewrite's marker compiles and holds.
    named = StructuredOutputsParams(json={"type": "object", "properties": {
        "default": {"type": "integer"}, "n": {"type": "integer", "maximum": 19876543}}, "required": ["default", "n"]})
    assert grammar_accepts(llm, named, '{"default": 1, "n": 19876543}')
    assert not grammar_accepts(llm, named, '{"default": 1, "n": 19876544}')
    assert not grammar_accepts(llm, named, '{"default": 9007199254740992, "n": 1}')
    obj = StructuredOutputsParams(json_object=True)
    assert grammar_accepts(llm, obj, '{"k": [1, 2]}') and not grammar_accepts(llm, obj, '{\n\n"k": 1}')


def test_mask_rows_fails_one_grammar_and_rolls_it_back(tiny_engines):
    """A grammar that raises partway through its draft: that item is reported, its grammar is
    back where it started, and the others' rows get exactly the masks they get alone."""
    from quickdraft.structured_output.bitmask import allocate_bitmask

    llm = tiny_engines("plain", "xgrammar")
    mgr, tok = llm.engine.structured, llm.get_tokenizer()
    so = StructuredOutputsParams(regex="[a-z]{2,12}")
    draft = tok.encode("abcdef", add_special_tokens=False)
    grammars = [mgr.grammar_for(so) for _ in range(3)]

    class Breaks:
        """The middle grammar: accepts one draft token, then raises."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def accept_tokens(self, tokens):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("injected")
            return self.inner.accept_tokens(tokens)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    broken = Breaks(grammars[1])
    V = llm.model_config.vocab_size
    logits = torch.zeros(3 * (len(draft) + 1), V)
    items = [(grammars[0], 0, draft), (broken, len(draft) + 1, draft), (grammars[2], 2 * (len(draft) + 1), draft)]
    errors = mgr.mask_rows(logits, items)
    assert list(errors) == [1] and "injected" in str(errors[1])
    alone = torch.zeros(len(draft) + 1, V)
    assert mgr.mask_rows(alone, [(grammars[2], 0, draft)]) == {}
    k = len(draft) + 1
    assert torch.equal(logits[:k], alone) and torch.equal(logits[2 * k:], alone)
    assert torch.equal(logits[k:2 * k], torch.zeros(k, V))  # the failed item's rows are left alone
    fresh, back = allocate_bitmask(1, V), allocate_bitmask(1, V)
    mgr.grammar_for(so).fill_bitmask(fresh, 0)
    grammars[1].fill_bitmask(back, 0)
    assert torch.equal(fresh, back)  # rolled back to its start


# A dozen record extractions that SmolLM2 does not know the answers of. With vLLM's defaults
# (any whitespace, integers of any length) it wrote digits or newlines until max_tokens on up
# to half of them: "population": 1111111111..., or "\n" twenty at a time between fields.
CITIES = [("Lyon", "France", 522000), ("Osaka", "Japan", 2750000), ("Porto", "Portugal", 232000),
          ("Leeds", "United Kingdom", 812000), ("Graz", "Austria", 291000), ("Cusco", "Peru", 428000),
          ("Bergen", "Norway", 286000), ("Dakar", "Senegal", 1438000), ("Perth", "Australia", 2141000),
          ("Quebec City", "Canada", 549000), ("Kraków", "Poland", 804000), ("Tampere", "Finland", 244000)]
CITY_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                                "population": {"type": "integer"}},
               "required": ["name", "country", "population"]}


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_smollm2_json_records_finish_within_120_tokens(smollm2_gguf, backend):
    """Greedy and two sampled runs of 12 record extractions (completion-style prompts, the
    hardest case seen) each end with valid JSON before 120 tokens, on both backends. (llguidance
    reads a schema's objects as open, as JSON Schema says; closed here as xgrammar does.)"""
    llm = LLM(str(smollm2_gguf), device="cpu", max_model_len=1024, structured_outputs_backend=backend)
    prompts = [f"Text: {c} is a city in {k} with about {p:,} inhabitants.\nRecord (JSON):" for c, k, p in CITIES]
    prompts += [f"Write a JSON record for the city of {c}.\n" for c, _, _ in CITIES]
    so = StructuredOutputsParams(json=CITY_SCHEMA, disable_additional_properties=True)
    for sp in (SamplingParams(temperature=0, max_tokens=120, structured_outputs=so),
               SamplingParams(temperature=0.8, seed=1, max_tokens=120, structured_outputs=so),
               SamplingParams(temperature=1.0, seed=7, max_tokens=120, structured_outputs=so)):
        for out in llm.generate(prompts, sp, use_tqdm=False):
            o = out.outputs[0]
            assert o.finish_reason == "stop" and len(o.token_ids) < 120, o.text
            jsonschema.validate(json.loads(o.text), CITY_SCHEMA)
