"""`dylora-moe serve` as a client sees it: a real server process on a loopback port, driven
with the official `openai` client (sync and async), on a tiny trained run whose experts
differ. Answers equal `generate` token for token; streamed deltas join to the answer;
concurrent requests of different mixtures each equal their solo answer; the exported
adapter under PeftModel equals the mixture at those gates."""
import asyncio
import json

import httpx
import pytest
import torch
from serverun import Server

openai = pytest.importorskip("openai")

from dylora_moe.data.formatting import alpaca_prompt  # noqa: E402
from dylora_moe.eval.generate import generation_config, generate_batch  # noqa: E402
from dylora_moe.eval.loading import load_run  # noqa: E402
from dylora_moe.eval.variants import custom, resolve  # noqa: E402

PROMPTS = ["Write a function add_3(xs) that returns a new list with 3 added to every element.",
           "Write a function reverse_text(s) that returns s reversed.", "def count_vowels(s):",
           "Return the largest of three numbers.", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def served(serve_run, tmp_path_factory):
    tmp, run_dir = tmp_path_factory.mktemp("serve"), serve_run
    with Server(run_dir, tmp, "--max_batch", "16", "--max_queue", "64", "--max_tokens", "64", "--max_n", "4") as server:
        yield server, load_run(run_dir), run_dir, tmp


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(loaded, text: str, variant: str, tokens: int = 12, chat: bool = False):
    """What `generate` decodes alone, greedy: (text, gates)."""
    prompt = alpaca_prompt(text) if chat else text
    config = generation_config(loaded.tokenizer, max_new_tokens=tokens)
    chosen = custom(variant, loaded.moe.config.num_experts) if isinstance(variant, list) else resolve(variant, 4)
    [(texts, gates)] = generate_batch(loaded, [prompt], config, chosen)
    return texts[0], gates


@pytest.mark.parametrize("variant", ["routed", "expert-0", "expert-2", "uniform", "base", [3.0, 0.0, 1.0, 0.0]])
def test_greedy_answers_equal_generate(served, client, variant):
    server, loaded, _, _ = served
    model = "run" if variant == "routed" or isinstance(variant, list) else f"run:{variant}"
    extra = {"gates": variant} if isinstance(variant, list) else None
    for text in PROMPTS[:3]:
        want, gates = expected(loaded, text, variant)
        got = client.completions.create(model=model, prompt=text, max_tokens=12, temperature=0, extra_body=extra)
        assert got.choices[0].text == want, (variant, text)
        assert got.weights_sha256 == loaded.weights_sha256
        if variant == "base":
            assert got.choices[0].gates == [0.0] * 4
        else:
            assert got.choices[0].gates == pytest.approx(gates, abs=1e-6)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=12, temperature=0, extra_body=extra)
    assert chat.choices[0].message.content == expected(loaded, PROMPTS[0], variant, chat=True)[0]


def test_the_variants_are_listed_and_differ(served, client):
    assert [m.id for m in client.models.list()] == ["run", "run:expert-0", "run:expert-1", "run:expert-2",
                                                   "run:expert-3", "run:uniform", "run:base"]
    answers = {m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
               for m in ("run:expert-0", "run:expert-1", "run:base")}
    assert len(set(answers.values())) == 3  # the experts are not the base, nor each other


def test_streamed_deltas_join_to_the_answer(served, client):
    for model, kwargs in (("run", {}), ("run:expert-1", {"stop": ["e"]}), ("run", {"temperature": 0.9, "seed": 7})):
        whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                               max_tokens=20, temperature=kwargs.get("temperature", 0),
                                               **{k: v for k, v in kwargs.items() if k != "temperature"})
        parts, finish, usage = [], None, None
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                    max_tokens=20, stream=True, stream_options={"include_usage": True},
                                                    temperature=kwargs.get("temperature", 0),
                                                    **{k: v for k, v in kwargs.items() if k != "temperature"}):
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    stopped = client.completions.create(model="run:expert-1", prompt=PROMPTS[1], max_tokens=40, temperature=0, stop="e")
    assert "e" not in stopped.choices[0].text


def test_sampling_follows_seed_n_and_max_tokens(served, client):
    ask = dict(model="run", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.9, n=3)
    first = client.completions.create(seed=11, **ask)
    again = client.completions.create(seed=11, **ask)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed repeats
    assert len({c.text for c in first.choices}) > 1  # n choices are n draws
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in first.choices)
    assert first.usage.completion_tokens <= 3 * 16
    two = client.completions.create(model="run", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=8, temperature=0, n=2)
    assert [c.text for c in two.choices][0] == two.choices[1].text  # greedy: n copies of one answer


def test_sixteen_concurrent_mixed_requests_each_equal_their_solo_answer(served, client):
    server = served[0]
    models = ["run", "run:expert-0", "run:expert-1", "run:expert-2", "run:expert-3", "run:uniform", "run:base"]
    asks = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)], 8 + i % 9) for i in range(16)]
    solo = [client.completions.create(model=m, prompt=p, max_tokens=t, temperature=0).choices[0].text
            for m, p, t in asks]

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            answers = await asyncio.gather(*(aclient.completions.create(model=m, prompt=p, max_tokens=t, temperature=0)
                                             for m, p, t in asks))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(together()) == solo
    sizes = _metric(server, "dylora_batch_size_bucket", 'le="1.0"'), _metric(server, "dylora_batch_size_count")
    assert sizes[0] < sizes[1]  # some forwards carried several rows


def test_metrics_count_requests_tokens_and_gate_mass(served, client):
    server = served[0]
    before = _metric(server, "dylora_completion_tokens_total")
    client.completions.create(model="run:expert-3", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert _metric(server, "dylora_completion_tokens_total") >= before + 1
    assert _metric(server, "dylora_expert_gate_mass_total", 'expert="3"') > 0
    assert _metric(server, "dylora_requests_total", 'status="200"') > 0
    assert _metric(server, "dylora_time_to_first_token_seconds_count") > 0
    assert _metric(server, "dylora_queue_depth") == 0


def test_the_exported_adapter_equals_the_mixture_at_those_gates(served):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dylora_moe.serve.export import export

    _, loaded, run_dir, tmp = served
    gates = [0.6, 0.0, 0.3, 0.1]
    export(run_dir, tmp / "adapter", gates="6,0,3,1")
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 * loaded.moe.config.lora_r and config["base_model_name_or_path"]
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad(), loaded.moe.override_gates(torch.tensor(gates)):
        want = loaded.moe(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                           tmp / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (tmp / "adapter" / "README.md").read_text().count("--max-lora-rank") == 2

    export(run_dir, tmp / "by-source", source="demo:strings")
    record = json.loads((tmp / "by-source" / "mixture.json").read_text())
    assert record["source"] == "demo:strings" and sum(record["gates"]) == pytest.approx(1.0)


def _metric(server, name: str, label: str = "") -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label}: not in /metrics")
