"""The demo: handlers, the named API through gradio_client, bad input, and a real browser."""

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from core.data import personas as P

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "models" / "persona-tiny"
pytestmark = pytest.mark.skipif(not (TINY / "bundle.json").is_file(), reason="assets/models/persona-tiny not built")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def app():
    from demo.handlers import DemoApp

    return DemoApp(TINY, device="cpu", max_new_tokens=24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    from demo.ui import build, configure_queue

    demo = configure_queue(build(app))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


# -- handlers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, msg", [
    ("", "empty"), ("   \n ", "empty"), ("x" * 50_000, "50,000 characters"),
    ("hello\x00world", "control characters"), ("bell\x07", "U\\+0007"), (None, "must be text"),
])
def test_bad_prompts(prompt, msg):
    from demo.handlers import DemoError, check_prompt

    with pytest.raises(DemoError, match=msg):
        check_prompt(prompt)


def test_unicode_prompt_is_fine(app):
    from demo.handlers import check_prompt

    assert check_prompt("  Comment dormir mieux ? 睡眠 🌙\n") == "Comment dormir mieux ? 睡眠 🌙"
    out = app.generate("Comment dormir mieux ? 睡眠 🌙", "steered", None)
    assert out["done"] and set(out["attributes"]) == {"verbosity", "tone", "words"}


def test_model_info_and_default_bundle(app, monkeypatch):
    from demo.handlers import BUNDLE_ENV, resolve_bundle

    info = app.model_info()
    assert info["bundle"] == "persona-tiny" and info["device"] == "cpu" and info["pool"] > 100
    # the bundle's decoding settings reach both decodings (what the steering experiment measured)
    assert info["decoding"] == app.bundle.decoding.to_dict() and info["decoding"]["repetition_penalty"] > 1
    for kw in (app.decoding_kw("greedy"), app.decoding_kw("sample", 3)):
        assert kw["repetition_penalty"] == info["decoding"]["repetition_penalty"]
    monkeypatch.setenv(BUNDLE_ENV, "/somewhere/else")
    assert resolve_bundle(None) == Path("/somewhere/else")
    assert resolve_bundle("x") == Path("x")


def test_steering_changes_generation_but_baseline_ignores_state(app):
    s = None
    for _, s in app.autopilot("busy executive", 6, s):
        pass
    base1 = app.generate("How do I get better sleep?", "baseline", s)["text"]
    base2 = app.generate("How do I get better sleep?", "baseline", None)["text"]
    assert base1 == base2  # the baseline never sees z
    terse = app.generate("How do I get better sleep?", "steered", None, point=[-1.0, -1.0])["text"]
    thorough = app.generate("How do I get better sleep?", "steered", None, point=[1.0, 1.0])["text"]
    assert terse != thorough


def test_sweep_is_one_batch_across_the_axis(app):
    res = app.sweep("How do I get better sleep?", "verbosity", None, 5)
    assert [r["point"][0] for r in res] == pytest.approx([-1, -0.5, 0, 0.5, 1])
    assert len({r["point"][1] for r in res}) == 1
    from demo.handlers import DemoError

    with pytest.raises(DemoError, match="sweep axis"):
        app.sweep("hi", "colour", None)


def test_stream_both_yields_growing_text(app):
    steps = list(app.stream_both("What helps with focus when working from home?", None))
    assert steps[-1][0]["done"] and steps[-1][1]["done"]
    lens = [len(s["text"]) for s, _ in steps]
    assert lens == sorted(lens)


def test_sampled_decoding_is_seeded_and_shared_by_the_side_by_side_streams(app):
    from demo.handlers import DemoError

    q, pt = "How do I get better sleep?", [0.6, 0.2]
    both = [(s["text"], b["text"]) for s, b in app.stream_both(q, None, pt, "sample", 5)][-1]
    # the two streams run at once in two threads; each equals its own run alone
    assert both == (app.generate(q, "steered", None, pt, "sample", 5)["text"],
                     app.generate(q, "baseline", None, pt, "sample", "5")["text"])
    seeds = [app.generate(q, "baseline", None, pt, "sample", k)["text"] for k in (6, 7, 8)]
    assert len({both[1], *seeds}) > 1  # the seed matters
    assert app.generate(q, "baseline", None, pt, "greedy", 99)["text"] == app.generate(q, "baseline", None)["text"]
    for bad, msg in [(("beam", 0), "decoding"), (("sample", -1), "seed"), (("sample", 1.5), "seed"),
                     (("sample", "x"), "seed"), (("sample", float("nan")), "seed")]:
        with pytest.raises(DemoError, match=msg):
            list(app.stream_both(q, None, pt, *bad))
        with pytest.raises(DemoError, match=msg):
            app.sweep(q, "verbosity", None, 3, pt, *bad)
    res = app.sweep(q, "verbosity", None, 3, pt, "sample", 2)
    assert [r["text"] for r in res] == [r["text"] for r in app.sweep(q, "verbosity", None, 3, pt, "sample", 2)]


def test_stream_counts_generated_tokens(app):
    steps = list(app.stream("How do I get better sleep?", "steered", None))
    counts = [s["tokens"] for s in steps]
    assert counts[:-1] == list(range(1, len(steps))) and counts[-1] == counts[-2]  # one update per token
    assert 1 <= counts[-1] <= app.max_new_tokens + 1


@pytest.mark.parametrize("x, y, want", [
    (0.5, -0.3, [0.5, -0.3]), (0.512, -0.287, [0.5, -0.3]), (3, -7, [1.0, -1.0]), ("0.25", 0, [0.25, 0.0]),
    (-0.0, 0.024, [0.0, 0.0]),
])
def test_map_point_clips_and_snaps_to_the_slider_step(x, y, want):
    from demo.handlers import map_point

    assert map_point(x, y) == want


@pytest.mark.parametrize("x, y, msg", [(None, 0, "two numbers"), ("left", 0, "two numbers"),
                                       (float("nan"), 0, "finite"), (0, float("inf"), "finite")])
def test_map_point_rejects_bad_input(x, y, msg):
    from demo.handlers import DemoError, map_point

    with pytest.raises(DemoError, match=msg):
        map_point(x, y)


def test_behaviour_map_has_a_click_layer_over_the_steerable_square(app):
    import plotly.graph_objects as go

    from demo import plots

    lat = app.latent(None)
    spec = plots.behaviour_map(lat, app.bundle.archetypes, app.map.axis_labels, app.bundle.axes, manual=[0.5, -0.3])
    assert json.loads(json.dumps(spec)) == spec  # plain JSON, as the page receives it
    fig = go.Figure(spec)  # raises on any property plotly does not know
    layer = fig.data[0]  # first, so every other trace is drawn above it
    assert layer.type == "heatmap" and layer.meta == plots.CLICK_TARGET and layer.hoverinfo != "skip"
    xs = np.asarray(layer.x)
    assert xs[0] == -plots.MAP_LIMIT and xs[-1] == plots.MAP_LIMIT
    np.testing.assert_allclose(np.diff(xs), plots.MAP_STEP)
    assert np.asarray(layer.z).shape == (len(xs), len(np.asarray(layer.y)))
    assert all(c[1] == "rgba(0,0,0,0)" for c in layer.colorscale)  # invisible
    manual = [t for t in fig.data if t.meta == "manual-point"]
    assert len(manual) == 1 and (manual[0].x[0], manual[0].y[0]) == (0.5, -0.3)
    assert fig.layout.dragmode is False  # a press on the map is a click, not a zoom box


def test_figure_specs_are_valid_plotly_and_follow_the_clicks(app):
    import plotly.graph_objects as go

    from demo import plots

    _, st = app.next_pair(None)
    for c in ("A", "B", "A"):
        _, st = app.choose(c, st)
        _, st = app.next_pair(st)
    lat = app.latent(st)
    curve = go.Figure(plots.learning_curve(lat))  # raises on any property plotly does not know
    bars, rate = curve.data
    assert bars.type == "bar" and len(bars.y) == 3 and list(bars.y) == [p for p in lat["p_choice"] if p is not None]
    assert [c == "#55A868" for c in bars.marker.color] == [p > 0.5 for p in bars.y]
    assert list(rate.y) == lat["running_accuracy"]
    assert "predicted" in curve.layout.title.text
    fig = go.Figure(plots.behaviour_map(lat, app.bundle.archetypes, app.map.axis_labels, app.bundle.axes))
    you = [t for t in fig.data if t.name == "you (inferred)"]
    assert len(you) == 1 and (you[0].x[0], you[0].y[0]) == (lat["map"]["x"], lat["map"]["y"])
    path = [t for t in fig.data if t.name == "your path"]
    assert len(path) == 1 and len(path[0].x) == len(lat["trajectory"]) == 4  # the prior, then one point a click
    assert fig.layout.title.text.endswith("3 clicks")
    assert not [t for t in fig.data if t.meta == "manual-point"]
    empty = go.Figure(plots.learning_curve(app.latent(None)))
    assert len(empty.data[0].y) == 0


# -- API through gradio_client ---------------------------------------------------------------------

def _gold_choice(view, weights):
    u = [float(np.dot(weights, list(P.score_all(view[k]).values()))) for k in ("a", "b")]
    return "B" if u[1] > u[0] else "A"


def test_two_clients_with_opposite_autopilots_stay_isolated(server):
    c1, c2 = _client(server), _client(server)
    w1, w2 = P.ARCHETYPES["busy executive"], P.ARCHETYPES["friendly tutor"]
    for i in range(10):  # interleaved, so any cross-talk would mix their clicks
        for c, w in ((c1, w1), (c2, w2)):
            view = c.predict(api_name="/next_pair")
            assert set(view) == {"pair_id", "prompt", "a", "b", "p_a"}
            lat = c.predict(_gold_choice(view, w), api_name="/choose")
            assert lat["n_clicks"] == i + 1
    l1, l2 = c1.predict(api_name="/latent"), c2.predict(api_name="/latent")
    assert l1["n_clicks"] == l2["n_clicks"] == 10
    p1, p2 = np.array([l1["map"]["x"], l1["map"]["y"]]), np.array([l2["map"]["x"], l2["map"]["y"]])
    assert (np.sign(p1) == np.sign(w1)).all() and (np.sign(p2) == np.sign(w2)).all(), (p1, p2)
    assert np.linalg.norm(p1 - p2) > 1.0
    assert np.asarray(l1["cov"]).shape == (2, 2)


def test_api_undo_reset_profiles_and_generate(server):
    c = _client(server)
    c.predict(api_name="/next_pair")
    c.predict("A", api_name="/choose")
    c.predict(api_name="/next_pair")
    assert c.predict("B", api_name="/choose")["n_clicks"] == 2
    assert c.predict(api_name="/undo")["n_clicks"] == 1
    prof = c.predict(api_name="/export_profile")
    assert prof["format"] == "few-shot-alignment-profile" and len(prof["clicks"]) == 1
    assert c.predict(api_name="/reset")["n_clicks"] == 0
    assert c.predict(json.dumps(prof), api_name="/import_profile")["n_clicks"] == 1
    out = c.predict("How do I get better sleep?", "steered", api_name="/generate")
    assert isinstance(out["text"], str) and set(out["attributes"]) == {"verbosity", "tone", "words"}
    sw = c.predict("How do I get better sleep?", "tone", api_name="/sweep")
    assert len(sw["answers"]) == 5


@pytest.mark.parametrize("endpoint, args, msg", [
    ("/generate", ("", "steered"), "empty"),
    ("/generate", ("x" * 50_000, "steered"), "characters"),
    ("/generate", ("hi\x00there", "steered"), "control characters"),
    ("/generate", ("hi", "sideways"), "mode must be"),
    ("/import_profile", ("{not json",), "not valid JSON"),
    ("/import_profile", ("x" * 300_000,), "limit"),
    ("/import_profile", (json.dumps({"format": "few-shot-alignment-profile", "version": 1, "clicks": [{"pair_id": "zzz", "choice": "A"}]}),),
     "not in this model's pool"),
    ("/import_profile", (json.dumps({"hello": 1}),), "format"),
    ("/import_profile", ("",), "no profile"),
    ("/choose", ("maybe",), "next pair first|choice must be"),
])
def test_api_bad_input_gets_a_clear_message_and_changes_nothing(server, endpoint, args, msg):
    import re

    c = _client(server)
    before = c.predict(api_name="/latent")
    with pytest.raises(Exception) as e:
        c.predict(*args, api_name=endpoint)
    assert re.search(msg, str(e.value)), str(e.value)
    after = c.predict(api_name="/latent")  # the app is up and the session unchanged
    assert after["n_clicks"] == before["n_clicks"] and after["map"] == before["map"]


def test_choose_before_a_pair_exists(server):
    c = _client(server)
    with pytest.raises(Exception, match="next pair first"):
        c.predict("A", api_name="/choose")
    assert c.predict(api_name="/latent")["n_clicks"] == 0


# -- a real browser ---------------------------------------------------------------------------------


def _click_map(page, x: float, y: float) -> None:
    """A real mouse click on the behaviour map at data coordinates (x, y)."""
    px, py = page.eval_on_selector("#map .js-plotly-plot", """(el, p) => {
        el.scrollIntoView({block: "center"});
        const L = el._fullLayout, r = el.getBoundingClientRect();
        return [r.left + L._size.l + L.xaxis.l2p(p[0]), r.top + L._size.t + L.yaxis.l2p(p[1])];
    }""", [x, y])
    page.mouse.click(px, py)


def _wait_manual_point(page, x: float, y: float) -> None:
    page.wait_for_function("""(p) => {
        const el = document.querySelector('#map .js-plotly-plot');
        return el && el.data.some(t => t.meta === 'manual-point' && Math.abs(t.x[0] - p[0]) < 1e-9
                                       && Math.abs(t.y[0] - p[1]) < 1e-9);
    }""", arg=[x, y], timeout=30_000)


@pytest.mark.browser
def test_browser_clicks_update_map_and_curve_and_generation_streams(server, app, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("FSA_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing but FSA_REQUIRE_BROWSER is set")
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("FSA_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_selector("#btn-a")
        page.wait_for_selector("#map .js-plotly-plot", timeout=30_000)
        page.wait_for_function("document.querySelector('#answer-a') && document.querySelector('#answer-a').innerText.length > 5",
                               timeout=30_000)
        for i in range(5):
            prev = page.inner_text("#answer-a")
            page.click("#btn-a" if i % 2 == 0 else "#btn-b")
            page.wait_for_function(f"document.querySelector('#status').innerText.includes('{i + 1}** clicks') || "
                                   f"document.querySelector('#status').innerText.includes('{i + 1} clicks')",
                                   timeout=30_000)
        status = page.inner_text("#status")
        assert "5 clicks" in status, status
        assert "5 clicks" in page.inner_text("#map")  # the map's title counts the clicks
        bars = page.eval_on_selector("#curve .js-plotly-plot", "el => el.data[0].y.length")
        assert bars == 5
        assert page.inner_text("#answer-a") != "" and prev is not None
        page.click("#btn-generate")
        page.wait_for_function("document.querySelector('#steered').innerText.trim().length > 3", timeout=60_000)
        page.wait_for_function("document.querySelector('#baseline').innerText.trim().length > 3", timeout=60_000)
        page.screenshot(path=str(shots / "demo.png"), full_page=True)

        # clicking the map sets the manual-steering point: sliders, checkbox, the cross on the map
        # (the sliders sit in a closed accordion, which is not rendered until the click opens it)
        assert page.eval_on_selector("#map .js-plotly-plot", "el => el.data.every(t => t.meta !== 'manual-point')")
        for x, y in ((0.5, -0.5), (-0.75, 0.25)):  # twice: the listener survives the map's redraws
            _click_map(page, x, y)
            _wait_manual_point(page, x, y)
            assert page.is_checked("#use-manual input")
            assert float(page.input_value("#manual-x input[type=number]")) == pytest.approx(x)
            assert float(page.input_value("#manual-y input[type=number]")) == pytest.approx(y)
        _click_map(page, 1.4, 1.4)  # outside the steerable square: nothing happens
        page.wait_for_timeout(500)
        assert float(page.input_value("#manual-x input[type=number]")) == pytest.approx(-0.75)
        assert "5 clicks" in page.inner_text("#status")  # a map click is not a preference click

        # ...and generation now steers from that point, exactly as the API does for it
        want = app.generate(page.input_value("#gen-prompt input"), "steered", None, point=[-0.75, 0.25])["text"]
        page.click("#btn-generate")
        page.wait_for_function("(w) => document.querySelector('#steered').innerText.replace(/\\s+/g, ' ').trim() === w",
                               arg=" ".join(want.split()), timeout=60_000)
        page.screenshot(path=str(shots / "demo-map-click.png"), full_page=True)
        browser.close()
    assert (shots / "demo.png").stat().st_size > 10_000


def test_model_dtype_bf16_for_smollm2_only_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    import torch

    import demo.handlers as H
    from demo.handlers import DemoError, model_dtype

    monkeypatch.delenv(H.DTYPE_ENV, raising=False)
    smol = tmp_path / "persona-smol"
    smol.mkdir()
    meta = json.loads((TINY / "bundle.json").read_text())
    meta["recipe"] = {**meta["recipe"], "base": "smol"}
    (smol / "bundle.json").write_text(json.dumps(meta))
    for native in (True, False):
        monkeypatch.setattr(H, "cpu_has_native_bf16", lambda: native)
        assert model_dtype(TINY, "cpu") is None  # the tiny model stays fp32
        assert model_dtype(smol, "cpu") == (torch.bfloat16 if native else None)  # emulated bf16 is slower
        assert model_dtype(tmp_path / "missing", "cpu") is None  # the loader names what is wrong
    monkeypatch.setenv(H.DTYPE_ENV, "bfloat16")
    assert model_dtype(TINY, "cpu") == torch.bfloat16
    monkeypatch.setenv(H.DTYPE_ENV, "float32")
    assert model_dtype(smol, "cpu") == torch.float32
    monkeypatch.setenv(H.DTYPE_ENV, "fp8")
    with pytest.raises(DemoError, match="FSA_DTYPE"):
        model_dtype(smol, "cpu")


def test_autopilot_at_the_manual_point_walks_towards_it(app):
    from demo.ui import AUTOPILOT_AT_POINT, build

    blocks = build(app)
    fn = next(f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == "ui_autopilot")
    # the page's sliders say (+1, -1): a user who wants thorough, formal answers
    *_, last = fn(AUTOPILOT_AT_POINT, 12, None, False, 1.0, -1.0)
    lat = app.latent(last[0])
    assert lat["n_clicks"] == 12 and lat["map"]["x"] > 0.3 and lat["map"]["y"] < -0.3
    assert lat["nearest_archetype"] == "thorough analyst"
    import gradio as gr

    with pytest.raises(gr.Error, match="map point"):  # a bad point is refused before any click
        next(iter(fn(AUTOPILOT_AT_POINT, 3, None, False, float("nan"), 0.0)))


def test_queue_settings(app, monkeypatch):
    from demo.ui import ANALYTICS_EVERY, CLICK_CONCURRENCY, build, configure_queue

    monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", raising=False)
    q = configure_queue(build(app))._queue
    assert q.default_concurrency_limit == CLICK_CONCURRENCY
    # gradio's per-event pandas summary (its /monitoring page) is rebuilt only every ANALYTICS_EVERY events
    assert q.ANAYLTICS_CACHE_FREQUENCY == ANALYTICS_EVERY
