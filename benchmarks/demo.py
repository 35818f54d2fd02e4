"""Demo speed through the app's real HTTP interface: click-to-update latency and steered
streaming, with 1 and with 10 concurrent users. Prints a table next to the DESIGN.md budgets.

    PYTHONPATH=. python benchmarks/demo.py [--bundle DIR] [--users 1 10] [--clicks 20] [--streams 3] [--json OUT]
    PYTHONPATH=. python benchmarks/demo.py --url http://127.0.0.1:7860/    # an app that is already running

By default it starts `app.py` in a subprocess on a free port, so the app's own queue and thread
settings are what is measured and the server does not share a Python process with the clients
(it does share the CPU: on a 2-core machine the clients' own work is in every number). Every
user is a thread with its own client, hence its own session; users start together and each
repeats its task, back to back unless --think gives them reading time between clicks. All times
are wall clock at the client: HTTP, the queue and JSON count.

Two kinds of client:
  gradio_client  a Client per user, the way scripts use the API. It polls its message queue
                 every 50 ms, which adds 0-50 ms to each call and delivers a stream in bursts.
  SSE            the page's own protocol (POST queue/join, then read the session's event stream),
                 which is what the browser sees. It can also call the page's UI-only events,
                 which gradio_client refuses (api_visibility="private").

  /choose               the API click: records A or B, returns the posterior (map point, ellipse)
  /choose + /next_pair  an API user's whole click: the posterior, then the next pair and P(A)
  UI click event        the page's "A/B is better" event: choose, next pair, map and curve figures
                        (server time: the part spent in Gradio's process_api)
  browser click         (1 user; Playwright with /usr/bin/chromium) button click -> the status line
                        and the map's title show the new click count, then one animation frame
  /generate, steered    a generator endpoint: one streamed message per generated token. Time to
                        the first token, and tokens/s from the first token to the last (SSE only:
                        gradio_client's bursts make per-stream rates meaningless); "all streams"
                        is every user's tokens over the wall time of the whole run
  in-process            choose + posterior + next pair called directly: the compute in a click
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["How do I get better sleep?", "Any tips for a safe bike commute?",
           "What helps with focus when working from home?"]
CHROMIUM = "/usr/bin/chromium"
CLICK_BUDGET_MS = 100.0  # DESIGN.md: click -> posterior, map, prediction, p95
TOKENS_BUDGET = 25.0  # DESIGN.md: steered generation with the SmolLM2-135M bundle, batch 1


# -- statistics ---------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p5": pct(xs, 5),
            "mean": statistics.fmean(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan")}


# -- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the app did not answer at {url} within {timeout:.0f} s")


def start_app(app: Path, bundle: str | None, port: int, threads: int, log: Path,
              cpus: set[int] | None = None) -> subprocess.Popen:
    """app.py in a subprocess; `cpus` pins it (and every thread it starts) to those CPUs."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(app), "--port", str(port), "--host", "127.0.0.1", "--threads", str(threads)]
    if bundle:
        cmd += ["--bundle", bundle]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=pin)


class AppConfig:
    """What the benchmark needs from the page's /config: which events to call."""

    def __init__(self, url: str) -> None:
        self.url = url
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            self.raw = json.load(r)
        self.prefix = self.raw.get("api_prefix", "/gradio_api").strip("/")
        self.ids = {c.get("props", {}).get("elem_id"): c["id"] for c in self.raw["components"]
                    if c.get("props", {}).get("elem_id")}

    def event(self, elem_id: str, trigger: str = "click") -> tuple[int, int]:
        """(fn_index, trigger_id) of the `trigger` event of the component with elem_id."""
        cid = self.ids.get(elem_id)
        for d in self.raw["dependencies"]:
            if cid is not None and [cid, trigger] in [list(t) for t in d["targets"]]:
                return d["id"], cid
        raise RuntimeError(f"the page has no {trigger} event on #{elem_id}; is this the steerable-alignment demo?")

    def api_event(self, name: str) -> int:
        for d in self.raw["dependencies"]:
            if d.get("api_name") == name and d.get("api_visibility") == "public":
                return d["id"]
        raise RuntimeError(f"the app has no /{name} endpoint")

    def load_event(self) -> int:
        for d in self.raw["dependencies"]:
            if any(t[1] == "load" for t in d["targets"]) and d.get("api_name") == "ui_restore":
                return d["id"]
        raise RuntimeError("the page has no ui_restore load event; is this the steerable-alignment demo?")


class PageSession:
    """Calls events the way the browser page does (POST queue/join, then read the session's SSE
    stream until the event completes); one instance is one browser tab's session."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.session_hash = uuid.uuid4().hex[:11]
        self.http = httpx.Client(base_url=cfg.url, timeout=httpx.Timeout(120.0))

    def call(self, fn_index: int, data: list[Any], trigger_id: int | None = None) -> dict[str, Any]:
        """One event: {data, bytes, server_s, t0, stream: [(time, data), ...]} with perf_counter
        times; `stream` holds a generator's intermediate outputs. Raises on an error message."""
        from gradio_client.utils import apply_diff

        t0 = time.perf_counter()
        r = self.http.post(f"{self.cfg.prefix}/queue/join", json={
            "data": data, "event_data": None, "fn_index": fn_index, "trigger_id": trigger_id,
            "session_hash": self.session_hash})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        size, stream, current = 0, [], None
        with self.http.stream("GET", f"{self.cfg.prefix}/queue/data", params={"session_hash": self.session_hash}) as s:
            for line in s.iter_lines():
                size += len(line)
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id:
                    continue
                out = msg.get("output") or {}
                if msg.get("msg") == "process_generating":  # the first carries values, the rest diffs
                    vals = out.get("data", [])
                    current = list(vals) if current is None else [apply_diff(c, v) for c, v in zip(current, vals)]
                    stream.append((time.perf_counter(), current))
                elif msg.get("msg") == "process_completed":
                    if not msg.get("success", False):
                        raise RuntimeError(f"event {fn_index} failed: {out.get('error') or msg}")
                    return {"data": out.get("data", []), "bytes": size, "server_s": out.get("duration"), "t0": t0,
                            "t1": time.perf_counter(), "stream": stream}
        raise RuntimeError(f"the stream closed before event {fn_index} completed")

    def close(self) -> None:
        self.http.close()


# -- users --------------------------------------------------------------------------------------


def run_users(n: int, make: Callable[[int], Any], task: Callable[[int, Any], dict[str, list[float]]],
              close: Callable[[Any], None] = lambda c: None) -> tuple[dict[str, list[float]], float]:
    """Run `task(i, client)` in n threads that start together (clients are made first, untimed).
    Returns the pooled lists of every measurement name and the wall time of the whole run."""
    clients = [make(i) for i in range(n)]
    barrier = threading.Barrier(n + 1)
    results: list[dict[str, list[float]]] = [{} for _ in range(n)]
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = task(i, clients[i])
        except BaseException as e:  # reported after the run
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        close(c)
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} users failed; the first: {errors[0]!r}") from errors[0]
    pooled: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.items():
            pooled.setdefault(k, []).extend(v)
    return pooled, wall


def pause(rng: random.Random, think: float) -> None:
    """A user's reading time between clicks: uniform in [0.5, 1.5] x think seconds."""
    if think > 0:
        time.sleep(rng.uniform(0.5, 1.5) * think)


def api_clicks(clicks: int, think: float) -> Callable[[int, Any], dict[str, list[float]]]:
    def task(i: int, c) -> dict[str, list[float]]:
        rng = random.Random(i)
        out: dict[str, list[float]] = {"choose": [], "next_pair": [], "cycle": []}
        c.predict(api_name="/next_pair")
        c.predict(rng.choice("AB"), api_name="/choose")  # warm-up click
        for _ in range(clicks):
            t0 = time.perf_counter()
            c.predict(api_name="/next_pair")
            t1 = time.perf_counter()
            lat = c.predict(rng.choice("AB"), api_name="/choose")
            t2 = time.perf_counter()
            assert isinstance(lat, dict) and "map" in lat, lat
            out["next_pair"].append(1000 * (t1 - t0))
            out["choose"].append(1000 * (t2 - t1))
            out["cycle"].append(1000 * (t2 - t0))
            pause(rng, think)
        return out
    return task


def ui_clicks(cfg: AppConfig, clicks: int, think: float) -> Callable[[int, PageSession], dict[str, list[float]]]:
    load = cfg.load_event()
    buttons = [cfg.event("btn-a"), cfg.event("btn-b")]

    choose, next_pair = cfg.api_event("choose"), cfg.api_event("next_pair")

    def task(i: int, page: PageSession) -> dict[str, list[float]]:
        rng = random.Random(100 + i)
        out: dict[str, list[float]] = {"ui_click": [], "ui_server": [], "ui_bytes": [], "sse_choose": []}
        page.call(load, [None])  # what the page does on load: restore or start a session, show a pair
        page.call(buttons[0][0], [None, False, 0, 0], buttons[0][1])  # warm-up click
        for _ in range(clicks):
            fn, trigger = rng.choice(buttons)
            r = page.call(fn, [None, False, 0, 0], trigger)  # state (kept on the server), use_manual, x, y
            assert len(r["data"]) >= 7, r["data"]
            out["ui_click"].append(1000 * (r["t1"] - r["t0"]))
            out["ui_server"].append(1000 * (r["server_s"] or float("nan")))
            out["ui_bytes"].append(float(r["bytes"]))
            r = page.call(choose, [rng.choice("AB"), None])  # the pair on screen, through the API event
            out["sse_choose"].append(1000 * (r["t1"] - r["t0"]))
            page.call(next_pair, [None])  # and a pair for the next UI click
            pause(rng, think)
        return out
    return task


def stream_stats(t0: float, updates: list[tuple[float, dict]]) -> dict[str, float]:
    """TTFT, tokens and tokens/s of one /generate stream from its (arrival time, message) list."""
    toks = [(t, int(m.get("tokens", k + 1))) for k, (t, m) in enumerate(updates) if not m.get("done")]
    if not toks:
        raise RuntimeError("/generate streamed no tokens before its final message")
    (t1, n1), (t2, n2) = toks[0], toks[-1]
    out = {"ttft": 1000 * (t1 - t0), "tokens": float(n2), "stream_s": t2 - t0}
    if t2 > t1 and n2 > n1:
        out["tok_s"] = (n2 - n1) / (t2 - t1)
    return out


def api_streams(streams: int) -> Callable[[int, Any], dict[str, list[float]]]:
    """Steered /generate through gradio_client (time to the first token only, see above)."""
    def task(i: int, c) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"ttft": [], "tokens": []}
        c.predict(api_name="/next_pair")
        c.predict("AB"[i % 2], api_name="/choose")  # one click, so z is this user's own
        for k in range(streams):
            t0 = time.perf_counter()
            job = c.submit(PROMPTS[(i + k) % len(PROMPTS)], "steered", api_name="/generate")
            updates = [(time.perf_counter(), m) for m in job]
            if not job.result().get("done"):
                raise RuntimeError(f"/generate ended without its final message: {job.result()!r}")
            st = stream_stats(t0, updates)
            out["ttft"].append(st["ttft"])
            out["tokens"].append(st["tokens"])
        return out
    return task


def sse_streams(cfg: AppConfig, streams: int) -> Callable[[int, PageSession], dict[str, list[float]]]:
    """Steered /generate read off the event stream as it arrives."""
    gen, choose, next_pair = cfg.api_event("generate"), cfg.api_event("choose"), cfg.api_event("next_pair")

    def task(i: int, page: PageSession) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"sse_ttft": [], "sse_tok_s": [], "sse_tokens": []}
        page.call(next_pair, [None])
        page.call(choose, ["AB"[i % 2], None])
        for k in range(streams):
            r = page.call(gen, [PROMPTS[(i + k) % len(PROMPTS)], "steered", None])
            st = stream_stats(r["t0"], [(t, d[0]) for t, d in r["stream"]])
            out["sse_ttft"].append(st["ttft"])
            out["sse_tokens"].append(st["tokens"])
            if "tok_s" in st:
                out["sse_tok_s"].append(st["tok_s"])
        return out
    return task


# Installed before the page's own scripts: notes when each event's final message reaches the page
# (Gradio reads its event stream with fetch), so a browser click splits into "received" (HTTP, the
# queue and the server) and the rest (the page's own drawing: Svelte and plotly).
RECEIVED_HOOK_JS = """
(() => {
  window.__fsaReceived = [];
  const orig = window.fetch;
  window.fetch = async function (...args) {
    const r = await orig.apply(this, args);
    const url = String((args[0] && args[0].url) || args[0]);
    if (!url.includes('/queue/data') || !r.body) return r;
    const [mine, theirs] = r.body.tee();
    (async () => {
      const rd = mine.getReader(), dec = new TextDecoder();
      for (;;) {
        const {value, done} = await rd.read();
        if (done) break;
        if (dec.decode(value, {stream: true}).includes('"process_completed"')) window.__fsaReceived.push(performance.now());
      }
    })();
    return new Response(theirs, {headers: r.headers, status: r.status, statusText: r.statusText});
  };
})();
"""


def browser_clicks(url: str, clicks: int, cpus: set[int] | None = None) -> dict[str, list[float]]:
    """One real page: click -> status and map redrawn (measured in the page with performance.now()),
    and when the click's result reached the page. `cpus` pins Chromium to those CPUs (it inherits
    the affinity of the thread that starts Playwright's driver)."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        return _browser_clicks(url, clicks)
    finally:
        os.sched_setaffinity(0, before)


def _browser_clicks(url: str, clicks: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    # textContent, not innerText: innerText makes the browser lay the page out, and this check runs
    # on every DOM mutation of the redraw (plotly makes many), which slowed the very redraw it timed.
    js = """async (n) => {
        window.__fsaReceived = [];
        const t0 = performance.now();
        const ok = () => document.querySelector('#status').textContent.includes(n + ' clicks')
                         && document.querySelector('#map').textContent.includes('· ' + n + ' clicks');
        const done = new Promise((resolve) => {
            const o = new MutationObserver(() => { if (ok()) { o.disconnect(); resolve(); } });
            o.observe(document.body, {subtree: true, childList: true, characterData: true});
        });
        document.querySelector(n % 2 ? '#btn-a' : '#btn-b').click();
        await done;
        await new Promise((r) => requestAnimationFrame(() => r()));
        const drawn = performance.now() - t0;
        const got = window.__fsaReceived.length ? window.__fsaReceived[0] - t0 : NaN;
        await new Promise((r) => setTimeout(r, 250));  // plotly's deferred resize, before the next click
        return [drawn, got];
    }"""
    out: dict[str, list[float]] = {"browser_click": [], "browser_received": [], "browser_render": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.add_init_script(RECEIVED_HOOK_JS)
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#map .js-plotly-plot", timeout=60_000)
        page.wait_for_function("document.querySelector('#answer-a') && "
                               "document.querySelector('#answer-a').innerText.length > 5", timeout=60_000)
        page.evaluate(js, 1)  # warm-up
        for n in range(2, clicks + 2):
            drawn, got = page.evaluate(js, n)
            out["browser_click"].append(drawn)
            out["browser_received"].append(got)
            out["browser_render"].append(drawn - got)
        browser.close()
    return out


def engine_clicks(bundle: str | None, clicks: int, threads: int) -> dict[str, list[float]]:
    """choose + next pair in-process (no HTTP, no queue, no figures): the compute part of a click."""
    import torch

    from demo.handlers import DemoApp

    torch.set_num_threads(threads)
    app = DemoApp(bundle, device="cpu")
    rng = random.Random(0)
    _, s = app.next_pair(None)
    out = []
    for _ in range(clicks + 1):
        t = time.perf_counter()
        _, s = app.choose(rng.choice("AB"), s)
        app.latent(s)
        _, s = app.next_pair(s)
        out.append(1000 * (time.perf_counter() - t))
    return {"engine_click": out[1:]}


# -- report -------------------------------------------------------------------------------------


CLICK = f"p95 <= {CLICK_BUDGET_MS:.0f} ms"
METRICS = [  # key, what, via, unit, budget, limit, higher is better
    ("engine_click", "click: choose + posterior + next pair", "in-process", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("choose", "click: /choose", "gradio_client", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("cycle", "click: /choose + /next_pair", "gradio_client", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("sse_choose", "click: /choose", "SSE", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("ui_click", "click: UI event (+ map, curve figures)", "SSE", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("ui_server", "  of which server time (process_api)", "SSE", "ms", "", None, False),
    ("browser_click", "click: in the page, to status + map drawn", "browser", "ms", CLICK, CLICK_BUDGET_MS, False),
    ("browser_received", "  of which until the update reached it", "browser", "ms", "", None, False),
    ("browser_render", "  of which drawing it (Svelte, plotly)", "browser", "ms", "", None, False),
    ("ttft", "steered /generate: time to 1st token", "gradio_client", "ms", "", None, False),
    ("sse_ttft", "steered /generate: time to 1st token", "SSE", "ms", "", None, False),
    ("sse_tok_s", "steered /generate: tokens/s per stream", "SSE", "tok/s", f">= {TOKENS_BUDGET:.0f} (SmolLM2-135M)",
     TOKENS_BUDGET, True),
    ("sse_total", "steered /generate: tokens/s, all streams", "SSE", "tok/s", "", None, True),
]


def rows_for(users: int, m: dict[str, list[float]], wall: dict[str, float]) -> list[dict[str, Any]]:
    if m.get("sse_tokens") and wall.get("sse_streams"):
        m = {**m, "sse_total": [sum(m["sse_tokens"]) / wall["sse_streams"]]}
    rows = []
    for order, (key, what, via, unit, budget, limit, higher) in enumerate(METRICS):
        xs = [x for x in m.get(key, []) if x == x]
        if not xs:
            continue
        st = summary(xs)
        tail = st["p5"] if higher else st["p95"]
        ok = None if limit is None else (tail >= limit if higher else tail <= limit)
        rows.append({"key": key, "what": what, "via": via, "users": users, "p50": st["p50"],
                     "tail": tail if len(xs) > 1 else float("nan"), "tail_name": "p5" if higher else "p95",
                     "unit": unit, "n": st["n"], "budget": budget, "ok": ok, "order": order})
    return rows


def _finite(x: Any) -> Any:
    """NaN -> None, so the JSON file is strict JSON."""
    if isinstance(x, float):
        return None if x != x else x
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'what':<44}{'via':<15}{'users':>5}{'p50':>9}{'p95':>9}  {'unit':<6}{'n':>4}  "
            f"{'budget (DESIGN.md)':<25}{'ok':>3}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["order"], r["users"])):
        tail = "" if r["tail"] != r["tail"] else f"{r['tail']:.4g}" + ("*" if r["tail_name"] == "p5" else "")
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        lines.append(f"{r['what']:<44}{r['via']:<15}{r['users']:>5}{r['p50']:>9.4g}{tail:>9}  {r['unit']:<6}"
                     f"{r['n']:>4}  {r['budget']:<25}{ok:>3}")
    lines.append("* for rates the tail column is p5 (the slow end)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="persona bundle for the launched app (default: app.py's default)")
    ap.add_argument("--url", help="measure an app that is already running at this URL instead of launching one")
    ap.add_argument("--app", type=Path, default=ROOT / "app.py", help="the script to launch (default: app.py)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the launched app and the in-process "
                                                           "measurement (default 1, as app.py)")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 10], help="concurrent users per run (default 1 10)")
    ap.add_argument("--clicks", type=int, default=20, help="timed clicks per user (after one warm-up)")
    ap.add_argument("--streams", type=int, default=3, help="steered generations per user and client kind")
    ap.add_argument("--think", type=float, default=0.0,
                    help="seconds a user reads between clicks, on average (default 0: back to back, a stress test)")
    ap.add_argument("--no-browser", action="store_true", help="skip the Playwright click measurement")
    ap.add_argument("--browser-cpu", type=int, default=None,
                    help="give Chromium this CPU and the launched app the others, as when the browser runs on the "
                         "user's own machine (default: all share every CPU)")
    ap.add_argument("--no-gradio-client", action="store_true", help="skip the gradio_client measurements (SSE only)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process (no HTTP) measurement")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = ap.parse_args()
    if min(args.users) < 1 or args.clicks < 1 or args.streams < 1 or args.think < 0:
        ap.error("--users, --clicks and --streams must be at least 1, and --think not negative")
    app_cpus = browser_cpus = None
    if args.browser_cpu is not None:
        cpus = os.sched_getaffinity(0)
        if args.browser_cpu not in cpus or len(cpus) < 2:
            ap.error(f"--browser-cpu {args.browser_cpu}: needs one of this process's CPUs {sorted(cpus)}, and another "
                     "one left for the app")
        browser_cpus, app_cpus = {args.browser_cpu}, cpus - {args.browser_cpu}

    from gradio_client import Client

    load_before = os.getloadavg()
    proc = None
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsa-demo-bench-{os.getpid()}.log"
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    if not args.no_engine:
        m = engine_clicks(args.bundle, args.clicks, args.threads)
        raw["in-process/1"] = m
        rows += rows_for(1, m, {})
    try:
        if args.url:
            url = args.url if args.url.endswith("/") else args.url + "/"
        else:
            url = f"http://127.0.0.1:{free_port()}/"
            t = time.time()
            proc = start_app(args.app, args.bundle, int(url.rsplit(":", 1)[1].strip("/")), args.threads, log, app_cpus)
            wait_http(url, proc)
            print(f"app up in {time.time() - t:.1f} s at {url} (log: {log})")
        wait_http(url, None)
        cfg = AppConfig(url)
        probe = Client(url, verbose=False)
        assert "map" in probe.predict(api_name="/latent")  # a session works end to end
        probe.close()

        def make_client(i: int):
            return Client(url, verbose=False)

        def close_client(c) -> None:
            c.close()

        for n in args.users:
            m: dict[str, list[float]] = {}
            wall: dict[str, float] = {}
            for name, make, task, close in (
                    ("api_clicks", make_client, api_clicks(args.clicks, args.think), close_client),
                    ("sse_clicks", lambda i: PageSession(cfg), ui_clicks(cfg, args.clicks, args.think),
                     PageSession.close),
                    ("api_streams", make_client, api_streams(args.streams), close_client),
                    ("sse_streams", lambda i: PageSession(cfg), sse_streams(cfg, args.streams), PageSession.close)):
                if args.no_gradio_client and name.startswith("api_"):
                    continue
                r, wall[name] = run_users(n, make, task, close)
                m.update(r)
            if n == 1 and not args.no_browser:
                if Path(CHROMIUM).exists():
                    m.update(browser_clicks(url, args.clicks, browser_cpus))
                else:
                    print(f"({CHROMIUM} not found: no browser measurement)")
            raw[f"http/{n}"] = {"measurements": m, "wall_s": wall}
            rows += rows_for(n, m, wall)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    from importlib.metadata import version

    from demo import ui

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "gradio": version("gradio"), "gradio_client": version("gradio_client"),
           "bundle": args.bundle or "app.py's default", "url": args.url or "launched app.py", "threads": args.threads,
           "clicks_per_user": args.clicks, "streams_per_user": args.streams, "think_s": args.think,
           "browser_cpus": sorted(browser_cpus) if browser_cpus else "shared", "app_cpus": sorted(app_cpus) if app_cpus else "all",
           "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "queue": None if args.url else {"default_concurrency_limit": ui.CLICK_CONCURRENCY,
                                           "generation": {"concurrency_id": ui.GENERATION_LANE,
                                                          "concurrency_limit": ui.GENERATION_CONCURRENCY}}}
    print(f"\ndemo benchmark: {env['cpus']} CPUs (1-min load average {env['load_average_before_after'][0]} before, "
          f"{env['load_average_before_after'][1]} after), gradio {env['gradio']}, bundle {env['bundle']}, "
          f"{args.threads} torch thread(s); {args.clicks} clicks ({args.think:g} s apart) and {args.streams} "
          f"streams per user; browser on {'CPU ' + str(args.browser_cpu) + ', app on the rest' if browser_cpus else 'the shared CPUs'}")
    if env["queue"]:
        q = env["queue"]
        print(f"queue: {q['default_concurrency_limit']} at once of each light event; every generation event in one "
              f"lane '{q['generation']['concurrency_id']}' of {q['generation']['concurrency_limit']}\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite({"env": env, "rows": rows, "raw": raw}), indent=1), encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
