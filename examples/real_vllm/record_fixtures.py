"""Records real vLLM 0.32 bytes into tests/fixtures/vllm-0.32.0/ (not run in CI).

Run with the venv's python (pyzmq and msgspec come with vLLM), against one engine started by
engines.sh with a small cache and a request-supplied chat template allowed:

    SWITCHYARD_VLLM_BLOCKS=64 SWITCHYARD_VLLM_ARGS=--trust-request-chat-template \
        examples/real_vllm/engines.sh start 1
    $SWITCHYARD_VLLM_HOME/bin/python examples/real_vllm/record_fixtures.py
    examples/real_vllm/engines.sh stop

(`--start` does the first and last step itself.) The engine serves the ChatML model; the
Mistral-style template (models/mistral) is given to /tokenize as the request's
`chat_template`, rendered by the same vLLM code as a model's own template.

What it does, in order: subscribes a SUB socket to the engine's KV events BEFORE any request;
sends completions with a shared prefix, ChatML chats whose history grows, then distinct prompts
that overflow the small cache (BlockRemoved), then POST /reset_prefix_cache (AllBlocksCleared)
and one completion after it; records every published message's raw frames with the phase it
arrived in; asks the replay socket (a DEALER sending ["", seq as 8 bytes big-endian]) for
everything from a sequence number; fetches /metrics, /kv_event_sources, /v1/models; and asks
/tokenize for the token ids of chat requests under both templates and of completion prompts.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from make_models import CHATML, MISTRAL  # noqa: E402

VERSION = "0.32.0"


def http(base, method, path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


class Recorder:
    """Receives every PUB message on a thread and tags it with the current phase."""

    def __init__(self, ctx, endpoint):
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.phase = "before any request"
        self.messages = []
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while not self.stop:
            if poller.poll(100):
                frames = self.sub.recv_multipart()
                with self.lock:
                    self.messages.append((self.phase, frames))
                    self.last = time.monotonic()

    def settle(self, quiet=3.0, timeout=60):
        """Waits until no message has arrived for `quiet` seconds since the call (the engine
        publishes a step's batch after the response may have been sent)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self.lock:
                if time.monotonic() - max(self.last, t0) >= quiet:
                    return
            time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8100")
    ap.add_argument("--kv", default="tcp://127.0.0.1:5600")
    ap.add_argument("--replay", default="tcp://127.0.0.1:5700")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/vllm-0.32.0"))
    ap.add_argument("--models", default=os.path.join(os.environ.get(
        "SWITCHYARD_VLLM_HOME", os.path.expanduser("~/.cache/switchyard/vllm-0.32.0")), "models"))
    ap.add_argument("--start", action="store_true", help="start (and stop) one engine with engines.sh")
    args = ap.parse_args()
    if args.start:
        env = dict(os.environ, SWITCHYARD_VLLM_BLOCKS="64",
                   SWITCHYARD_VLLM_ARGS="--trust-request-chat-template")
        subprocess.run([os.path.join(HERE, "engines.sh"), "start", "1"], check=True, env=env)
    try:
        record(args)
    finally:
        if args.start:
            subprocess.run([os.path.join(HERE, "engines.sh"), "stop"], check=False)


def record(args):
    base, model = args.base, args.model
    os.makedirs(args.out, exist_ok=True)
    ctx = zmq.Context()
    rec = Recorder(ctx, args.kv)
    # The SUB socket's subscription must reach the PUB socket before the first batch is
    # published (ZMQ drops what a PUB sends before it knows the subscriber).
    time.sleep(2.0)

    sent = []  # every request sent, with the token ids vLLM gives its prompt

    def tokenize_completion(prompt):
        return json.loads(http(base, "POST", "/tokenize", {"model": model, "prompt": prompt}))["tokens"]

    def tokenize_chat(messages, template=None, **extra):
        body = {"model": model, "messages": messages, **extra}
        if template is not None:
            body["chat_template"] = template
        return json.loads(http(base, "POST", "/tokenize", body))["tokens"]

    def complete(phase, prompt):
        rec.phase = phase
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        http(base, "POST", "/v1/completions", body)
        sent.append({"phase": phase, "path": "/v1/completions", "body": body,
                     "prompt_token_ids": tokenize_completion(prompt)})
        rec.settle()

    def chat(phase, messages):
        rec.phase = phase
        body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
        http(base, "POST", "/v1/chat/completions", body)
        sent.append({"phase": phase, "path": "/v1/chat/completions", "body": body,
                     "prompt_token_ids": tokenize_chat(messages)})
        rec.settle()

    shared = ("You are a careful assistant for a railway switchyard. Answer in short sentences, "
              "name the track and the signal for every move, and never guess a timetable. ") * 2
    shared = shared * 2  # ~130 tokens: four full blocks of 32
    questions = [
        "Which track does the 07:10 freight use, and which signal clears it out of the yard?",
        "When is the next shunting window on track 4, and who has to sign the movement order?",
        "List the signals between the hump and bowl track 9, in the order a cut passes them.",
    ]
    for name, q in zip(("first", "second", "third"), questions):
        # Each question repeated: its own blocks, chained to the shared prefix's last block.
        complete(f"shared prefix: {name}", shared + q + " " + q)

    system = "You are the yard master's assistant. Keep answers under twenty words."
    history = [{"role": "system", "content": system}]
    for i, q in enumerate(["Where is wagon 4471?", "Move it to track 12 after the 08:00 departure.",
                           "And the brake test?"]):
        history.append({"role": "user", "content": q})
        chat(f"chat turn {i + 1}", list(history))
        history.append({"role": "assistant", "content": f"Noted, step {i + 1} is scheduled."})

    words = ["ballast", "bogie", "coupler", "derail", "frog", "gauge", "hump", "interlock",
             "jumper", "kingpin", "lamp", "manifest", "notch", "outrider", "pantograph", "quadrant"]
    for i, w in enumerate(words):
        # ~300 tokens each (about 10 blocks of 32): 16 of them overflow a 64-block cache.
        text = f"Request {i}: " + " ".join(f"{w}-{i}-{j}" for j in range(60))
        complete(f"eviction {i + 1}/{len(words)}", text)

    rec.phase = "reset_prefix_cache"
    http(base, "POST", "/reset_prefix_cache")
    rec.settle()
    complete("after the reset", shared + questions[0])
    rec.settle(quiet=3)
    rec.stop = True
    rec.t.join()

    live = rec.messages
    print(f"recorded {len(live)} live messages")
    seqs = [int.from_bytes(f[1], "big") for _, f in live]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap in live sequence: {seqs}"
    assert seqs[0] == 0, "the SUB socket missed the first batch"

    # One replay exchange: everything from the first post-reset batches' start.
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(args.replay)
    start = max(0, len(live) - 6)
    request = [b"", start.to_bytes(8, "big")]
    dealer.send_multipart(request)
    replies = []
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    while True:
        if not poller.poll(10_000):
            raise SystemExit("replay: no reply within 10 s")
        msg = dealer.recv_multipart()
        replies.append(msg)
        if len(msg) >= 2 and msg[-2] == (-1).to_bytes(8, "big", signed=True):
            break
    dealer.close(linger=0)
    print(f"replay from {start}: {len(replies)} reply messages")

    block_size = None
    import msgspec
    for _, f in live:
        batch = msgspec.msgpack.decode(f[2])
        events = batch[1] if isinstance(batch, list) else batch["events"]
        for e in events:
            if isinstance(e, dict) and e.get("type") == "BlockStored":
                block_size = e["block_size"]
            elif isinstance(e, list) and e[0] == "BlockStored":
                block_size = e[4]
    hexs = lambda frames: [x.hex() for x in frames]  # noqa: E731
    write_json(args.out, "live_batches.json", {
        "vllm_version": VERSION, "block_size": block_size,
        "endpoint": args.kv,
        "messages": [{"frames": hexs(f), "note": phase} for phase, f in live],
        "requests": sent,
    })
    write_json(args.out, "replay_exchange.json", {
        "vllm_version": VERSION, "endpoint": args.replay,
        "request": hexs(request), "replies": [hexs(m) for m in replies],
    })
    with open(os.path.join(args.out, "metrics.txt"), "wb") as fh:
        fh.write(http(base, "GET", "/metrics"))
    write_json(args.out, "kv_event_sources.json", json.loads(http(base, "GET", "/kv_event_sources")))
    write_json(args.out, "models.json", json.loads(http(base, "GET", "/v1/models")))

    # Token ids of chats under both templates, and of completion prompts.
    convo = [
        [{"role": "user", "content": "Hello there!"}],
        [{"role": "system", "content": system}, {"role": "user", "content": "Where is wagon 4471?"}],
        [{"role": "system", "content": system}, {"role": "user", "content": "Where is wagon 4471?"},
         {"role": "assistant", "content": "On track 3, behind the tank cars."},
         {"role": "user", "content": "Move it to track 12 — über die Weiche 7, s'il vous plaît. 🚂"}],
        [{"role": "user", "content": "Tabs\tand\nnewlines,   runs of spaces, [INST] literal tags [/INST] and <|im_end|>."}],
    ]
    cases = []
    for name, template in (("chatml", CHATML), ("mistral", MISTRAL)):
        for i, messages in enumerate(convo):
            for gen in (True, False):
                cases.append({
                    "label": f"{name}: conversation {i}, add_generation_prompt={gen}",
                    "template": name, "path": "/v1/chat/completions",
                    "body": {"model": model, "messages": messages, "add_generation_prompt": gen},
                    "token_ids": tokenize_chat(messages, template, add_generation_prompt=gen),
                })
    for i, prompt in enumerate(["Hello world", shared, "  leading spaces, ünïcödé and 数字 123456789",
                                "<s>[INST] a literal special token [/INST]"]):
        cases.append({"label": f"completion {i}", "template": None, "path": "/v1/completions",
                      "body": {"model": model, "prompt": prompt},
                      "token_ids": tokenize_completion(prompt)})
        cases.append({"label": f"completion {i}, add_special_tokens=false", "template": None,
                      "path": "/v1/completions",
                      "body": {"model": model, "prompt": prompt, "add_special_tokens": False},
                      "token_ids": json.loads(http(base, "POST", "/tokenize", {
                          "model": model, "prompt": prompt, "add_special_tokens": False}))["tokens"]})
    write_json(args.out, "chat_token_ids.json", {"vllm_version": VERSION, "cases": cases})
    copy_tokenizer(args.models, os.path.join(args.out, "tokenizer"))
    print(f"wrote {args.out}")


def copy_tokenizer(models, out):
    """The tokenizer the tests need: tokenizer.json (17 MB, the same in both model dirs)
    gzipped once, and each template's tokenizer_config.json and chat_template.jinja."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(models, "chatml", "tokenizer.json"), "rb") as src:
        data = src.read()
    with open(os.path.join(models, "mistral", "tokenizer.json"), "rb") as other:
        assert other.read() == data, "the two model dirs share one tokenizer.json"
    with open(os.path.join(out, "tokenizer.json.gz"), "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as gz:
            gz.write(data)
    for name in ("chatml", "mistral"):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for f in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(os.path.join(models, name, f), os.path.join(out, name, f))


def write_json(out, name, value):
    with open(os.path.join(out, name), "w") as fh:
        json.dump(value, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main()
