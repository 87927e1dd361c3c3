"""The serving scheduler in-process (no HTTP): rows with different gates share each forward,
join and leave between steps, and every row decodes exactly what `moe.generate` decodes for
the same prompt and gates."""
import time

import pytest
import torch
from conftest import VOCAB, make_moe, randomize_experts

from dylora_moe.eval.variants import custom, gate_context, resolve
from dylora_moe.serve.decoding import Sampling, TextStream
from dylora_moe.serve.engine import Engine
from dylora_moe.serve.scheduler import Job, QueueFull, Scheduler


class Tokens:
    """A stand-in tokenizer: token t is the character chr(0x4e00 + t); 2 is EOS."""
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + t) for t in ids if not (skip_special_tokens and t == 2))


def moe_for(routing="sequence", seed=0, router_input="base_hidden"):
    moe = make_moe("llama", num_experts=4, routing=routing, router_input=router_input)
    randomize_experts(moe, seed=seed, scale=1.0)
    with torch.no_grad():  # routers that tell prompts apart
        moe.router.gate.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
        for layer in moe.experts.values():
            if layer.lora_router is not None:
                layer.lora_router.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
    return moe.eval()


def reference(moe, prompt, variant, steps):
    """moe.generate alone, greedy: the tokens after the prompt (EOS included, as served)."""
    ids = torch.tensor([prompt])
    with gate_context(moe, variant):
        out = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0, eos_token_id=2)
    return out[0, len(prompt):].tolist()


def run_jobs(moe, jobs_spec, max_batch=16, stagger=False):
    """Serve (prompt, variant, max_tokens) jobs through a Scheduler; their tokens and gates."""
    events = {}
    scheduler = Scheduler(Engine(moe, pad_id=0), Tokens(), max_batch=max_batch, max_queue=64)
    jobs = []
    for i, (prompt, variant, steps) in enumerate(jobs_spec):
        events[i] = []
        fixed = None if variant.routed else variant.tensor()
        jobs.append(Job([prompt], fixed, Sampling(max_tokens=steps, temperature=0.0), 1, events[i].append,
                        deadline=time.monotonic() + 120))
    scheduler.start()
    try:
        for job in jobs:
            scheduler.submit(job)
            if stagger:
                time.sleep(0.01)  # later jobs join a batch already decoding
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(any(e[0] in ("finish", "error") for e in ev)
                                                      for ev in events.values()):
            time.sleep(0.01)
    finally:
        scheduler.stop()
    return events


def tokens_of(events):
    text = "".join(e[2] for e in events if e[0] == "delta")
    return [ord(c) - 0x4E00 for c in text]


PROMPTS = [[1, 5, 9, 13], [1, 7, 7, 30, 41, 8, 99, 4, 5], [1, 200], [1, 3, 3, 3, 3, 3, 60], [1, 77, 12]]


@pytest.mark.parametrize("stagger,router_input", [(False, "base_hidden"), (True, "base_hidden"), (True, "layer")])
def test_mixed_variants_in_one_batch_equal_generate_alone(stagger, router_input):
    """With routers in the layers (token routing inside the pass), routed rows batch too."""
    moe = moe_for(routing="token" if router_input == "layer" else "sequence", router_input=router_input)
    names = ["routed", "expert-0", "expert-3", "uniform", "base"]
    spec = [(PROMPTS[(i + i // 5) % len(PROMPTS)], resolve(names[i % len(names)], 4), 6 + i % 5) for i in range(12)]
    spec.append((PROMPTS[1], custom([3, 0, 1, 0], 4), 9))
    events = run_jobs(moe, spec, max_batch=5, stagger=stagger)  # fewer rows than jobs: some wait, join later
    for i, (prompt, variant, steps) in enumerate(spec):
        want = reference(moe, prompt, variant, steps)
        got = tokens_of(events[i])
        finish = [e for e in events[i] if e[0] == "finish"][0]
        assert got == [t for t in want if t != 2], (i, variant.name)
        assert finish[3] == len(want)
        gates = [e[2] for e in events[i] if e[0] == "gates"][0]
        if not variant.routed:
            assert gates == pytest.approx(list(variant.gates))
    routed = [[e[2] for e in events[i] if e[0] == "gates"][0] for i, (_, v, _) in enumerate(spec) if v.routed]
    assert len({max(range(4), key=g.__getitem__) for g in routed}) >= 2  # the router sent rows to different experts


def test_zero_gates_are_the_base_exactly():
    moe = moe_for()
    engine = Engine(moe, pad_id=0)
    logits, _ = engine.prefill([PROMPTS[1]], [torch.zeros(4)])
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad(), moe.experts_disabled():
        plain = moe.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[0, -1]
    assert torch.equal(logits[0], plain)


def test_token_routing_is_served_alone_and_equals_generate():
    moe = moe_for(routing="token")
    spec = [(PROMPTS[0], resolve("routed", 4), 7), (PROMPTS[1], resolve("expert-2", 4), 5),
            (PROMPTS[3], resolve("routed", 4), 6)]
    events = run_jobs(moe, spec)
    for i, (prompt, variant, steps) in enumerate(spec):
        assert tokens_of(events[i]) == [t for t in reference(moe, prompt, variant, steps) if t != 2]


def test_text_stream_holds_back_a_stop_string_and_cuts_there():
    stream = TextStream(Tokens(), stop=["\u4e01\u4e03"])
    assert stream.push(5) == ("\u4e05", False)
    assert stream.push(1) == ("", False)           # might begin the stop string: held
    assert stream.push(4) == ("\u4e01\u4e04", False)  # it did not
    assert stream.push(1) == ("", False)
    assert stream.push(3) == ("", True)            # the stop string: cut, not sent
    assert stream.text == "\u4e05\u4e01\u4e04"


def test_a_full_queue_refuses_and_a_cancelled_row_leaves():
    moe = moe_for()
    scheduler = Scheduler(Engine(moe, pad_id=0), Tokens(), max_batch=2, max_queue=1)
    sink = []
    job = Job([PROMPTS[0]], None, Sampling(max_tokens=5, temperature=0.0), 1, sink.append, time.monotonic() + 60)
    scheduler.submit(job)
    with pytest.raises(QueueFull):
        scheduler.submit(Job([PROMPTS[1]], None, Sampling(max_tokens=5), 1, sink.append, time.monotonic() + 60))
    scheduler.cancel(job)
    scheduler.start()
    try:
        time.sleep(0.2)
        assert not scheduler.rows and not scheduler.waiting and not sink  # nothing generated for it
    finally:
        scheduler.stop()


def test_chat_prompts_use_the_template_else_the_training_one():
    from types import SimpleNamespace

    from dylora_moe.data.formatting import alpaca_prompt
    from dylora_moe.data.tokenize import build_demo_tokenizer
    from dylora_moe.serve.prompts import chat_prompt
    from dylora_moe.serve.protocol import APIError

    tok = build_demo_tokenizer(["hello there, write add_3", "system: be brief"], vocab_size=300)
    say = [SimpleNamespace(role="system", text=lambda: "be brief"), SimpleNamespace(role="user", text=lambda: "hi")]
    bos = [tok.bos_token_id]
    assert chat_prompt(tok, say) == bos + tok(alpaca_prompt("hi", "system: be brief"), add_special_tokens=False)["input_ids"]
    with pytest.raises(APIError, match="the last message must be the user's"):
        chat_prompt(tok, say[:1])
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    assert chat_prompt(tok, say) == tok("[system]be brief[user]hi[assistant]", add_special_tokens=False)["input_ids"]
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError, match="roles must alternate") as refused:
        chat_prompt(tok, say)
    assert refused.value.status == 400 and refused.value.param == "messages"
