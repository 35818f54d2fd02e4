"""Layout and wiring of the Gradio page, plus the named API endpoints (see README)."""

from __future__ import annotations

import functools
import html
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr
from gradio.components.plot import PlotData

from demo import plots
from demo.handlers import DECODINGS, MAX_SEED, SAMPLE_TEMPERATURE, SAMPLE_TOP_P, DemoApp, DemoError, map_point

try:  # ZeroGPU on Hugging Face Spaces; a no-op decorator everywhere else
    import spaces

    gpu = spaces.GPU
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    def gpu(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)

STORAGE_KEY = "few-shot-alignment-session-v1"

# The queue, for a small CPU box (a cpu-basic Space has 2 vCPUs). Measured with benchmarks/demo.py:
# 10 users clicking back to back, persona-tiny, 2 cores shared with other work, so read the ratios.
# - Light events (clicks, pairs, the posterior, profiles) keep no per-user state on the server
#   and the engine only reads its weights, so several may run at once; Gradio's default is one
#   call of each event at a time. They are CPU-bound and partly hold the GIL, so running more than
#   the 2 cores only time-slices them: with 4 at once an API /choose took 220-240 ms (median)
#   against 140-170 ms with 2 and 72 ms with 1, yet with 1 the page's click event had the longest
#   tail (p95 2.0-2.3 s against 1.3-1.8 s with 2). Hence CLICK_CONCURRENCY = 2, one per core.
# - Generation holds the policy's lock (FiLM conditioning is module state), so two generations on
#   one model never overlap whatever the queue allows. All generation events (page and API,
#   sweeps too) share one lane of GENERATION_CONCURRENCY = 1: waiting users keep their place in a
#   FIFO line that the page shows, instead of all looking "running" while blocked on the lock,
#   and a burst of generations cannot take the worker threads that clicks need. One page
#   generation already keeps both cores busy (steered and baseline stream side by side).
CLICK_CONCURRENCY = 2
GENERATION_LANE = "generation"
GENERATION_CONCURRENCY = 1
AUTOPILOT_AT_POINT = "the manual steering point"  # autopilot choice: a simulated user at the sliders' point
MAP_CLICK_ID = "map-click"  # the hidden button that carries a click on the map to the server

# Clicking the map. gr.Plot has no click event, so a small script (run once when the page loads)
# listens to plotly's `plotly_click` on the map figure, keeps the clicked point in
# window.__fsaMapClick and presses the hidden #map-click button. That button's event swaps the
# point into its x, y inputs in its `js` step (MAP_CLICK_INPUTS_JS) before the server sees them,
# so a click goes through the same Python path as moving the sliders. plotly only reports clicks
# on traces, hence the invisible heatmap that plots.behaviour_map lays over the steerable square;
# the listener is attached again whenever the plot element is replaced.
MAP_CLICK_HOOK_JS = """
() => {
  if (window.__fsaMapHook) return [];
  window.__fsaMapHook = true;
  const step = %(step)r, limit = %(limit)r;
  const snap = (v) => Math.max(-limit, Math.min(limit, Math.round(Number(v) / step) * step));
  const onClick = (ev) => {
    const pts = (ev && ev.points) || [];
    const pt = pts.find((p) => p.data && p.data.meta === %(tag)r) || pts[0];
    if (!pt || !Number.isFinite(Number(pt.x)) || !Number.isFinite(Number(pt.y))) return;
    window.__fsaMapClick = [snap(pt.x), snap(pt.y)];
    const btn = document.getElementById(%(button)r);
    if (btn) btn.click();
  };
  const attach = () => {
    const gd = document.querySelector("#map .js-plotly-plot");
    if (!gd || typeof gd.on !== "function" || typeof gd.removeListener !== "function") return;
    gd.removeListener("plotly_click", onClick);  // at most one listener per plot element
    gd.on("plotly_click", onClick);
  };
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
  attach();
  return [];
}
""" % {"step": plots.MAP_STEP, "limit": plots.MAP_LIMIT, "tag": plots.CLICK_TARGET, "button": MAP_CLICK_ID}
MAP_CLICK_INPUTS_JS = """
(state, x, y) => {
  const p = window.__fsaMapClick;
  window.__fsaMapClick = null;
  return p ? [state, p[0], p[1]] : [state, x, y];
}
"""


def _errors(fn: Callable) -> Callable:
    """Turn DemoError (bad input) into a visible message; the state outputs are left unchanged."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a, **k):
            try:
                yield from fn(*a, **k)
            except DemoError as e:
                raise gr.Error(str(e)) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except DemoError as e:
            raise gr.Error(str(e)) from None
    return wrapper




# Gradio's queue rebuilds a pandas summary of its last 10,000 events (for its /monitoring page,
# which this app does not enable) after every event by default: a groupby that grew to 5-10 % of
# the server's CPU under 10 clicking users (py-spy). Once every ANALYTICS_EVERY events is plenty.
ANALYTICS_EVERY = 1000


def configure_queue(demo: gr.Blocks) -> gr.Blocks:
    """The queue settings app.py serves with (the tests use them too); see the notes above."""
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(ANALYTICS_EVERY))  # read when the queue is made
    return demo.queue(default_concurrency_limit=CLICK_CONCURRENCY)


def _plot(spec: dict) -> PlotData:
    """A figure spec from demo.plots as gr.Plot's payload, serialised once with json (gr.Plot would
    otherwise need a plotly Figure, whose construction validates every property: ~35 ms a figure)."""
    return PlotData(type="plotly", plot=json.dumps(spec))


def _md_answer(text: str) -> str:
    return html.escape(text).replace("\n", "  \n") if text else "…"


def build(app: DemoApp) -> gr.Blocks:
    info = app.model_info()
    labels = app.map.axis_labels
    axes = app.bundle.axes
    archetypes = list(app.bundle.archetypes)

    # -- render helpers ------------------------------------------------------------------------
    def visuals(state: dict | None, manual: list[float] | None = None):
        lat = app.latent(state)
        pair = app.current_pair(state)
        if pair is None:
            prompt_md = "*Press **Next pair** (or click A/B after one loads).*"
            a_md = b_md = ""
            pred = ""
        else:
            prompt_md = f"**Prompt:** {html.escape(pair['prompt'])}"
            a_md, b_md = _md_answer(pair["a"]), _md_answer(pair["b"])
            pred = f"The model thinks you prefer **A** with probability **{pair['p_a']:.2f}**."
        settled = lat["settled_at"]
        status = (f"**{lat['n_clicks']}** clicks ({lat['n_skipped']} skipped) · you look most like "
                  f"**{lat['nearest_archetype']}** · map position ({lat['map']['x']:+.2f}, {lat['map']['y']:+.2f})")
        if settled is not None:
            status += f" · the estimate settled after **{settled}** clicks"
        fig_map = _plot(plots.behaviour_map(lat, app.bundle.archetypes, labels, axes, manual))
        fig_curve = _plot(plots.learning_curve(lat))
        return prompt_md, a_md, b_md, pred, fig_map, fig_curve, status

    def manual_point(use_manual: bool, x: float, y: float) -> list[float] | None:
        return map_point(x, y, plots.MAP_STEP, plots.MAP_LIMIT) if use_manual else None

    def map_figure(state: dict | None, manual: list[float] | None):
        return _plot(plots.behaviour_map(app.latent(state), app.bundle.archetypes, labels, axes, manual))

    # -- UI events -------------------------------------------------------------------------------
    @_errors
    def ui_restore(saved):
        state = saved if isinstance(saved, dict) else None
        try:
            out = visuals(state)
        except DemoError:
            state = None
            out = visuals(None)
        if state is None or app.state_of(state).current is None:
            _, state = app.next_pair(state)
            out = visuals(state)
        return (state, *out)

    @_errors
    def ui_choose(choice, state, use_manual, x, y):
        _, state = app.choose(choice, state)
        _, state = app.next_pair(state)
        return (state, state, *visuals(state, manual_point(use_manual, x, y)))

    @_errors
    def ui_next(state, mode, use_manual, x, y):
        state = app.set_mode(mode, state)
        s = app.state_of(state)
        if s.current is None:
            _, state = app.next_pair(state)
        else:  # replace the pair on screen without recording a click
            s.current = None
            _, state = app.next_pair(s.to_dict())
        return (state, state, *visuals(state, manual_point(use_manual, x, y)))

    @_errors
    def ui_undo(state, use_manual, x, y):
        _, state = app.undo(state)
        return (state, state, *visuals(state, manual_point(use_manual, x, y)))

    @_errors
    def ui_reset(state, use_manual, x, y):
        _, state = app.reset(state)
        _, state = app.next_pair(state)
        return (state, state, *visuals(state, manual_point(use_manual, x, y)))

    @_errors
    def ui_mode(mode, state):
        state = app.set_mode(mode, state)
        return state, state

    @_errors
    def ui_autopilot(who, n, state, use_manual, x, y):
        if who == AUTOPILOT_AT_POINT:  # a simulated user who stands at the manual-steering point
            who = map_point(x, y, plots.MAP_STEP, plots.MAP_LIMIT)
        for _, state in app.autopilot(who, int(n), state):
            yield (state, state, *visuals(state, manual_point(use_manual, x, y)))
        _, state = app.next_pair(state)
        yield (state, state, *visuals(state, manual_point(use_manual, x, y)))

    @_errors
    def ui_manual(state, use_manual, x, y):
        return map_figure(state, manual_point(use_manual, x, y))

    @_errors
    def ui_slide(state, x, y):
        """A slider moved: steer from the sliders' point from now on."""
        return True, map_figure(state, manual_point(True, x, y))

    @_errors
    def ui_map_click(state, x, y):
        """The map was clicked at (x, y): move the sliders there and steer from that point."""
        px, py = map_point(x, y, plots.MAP_STEP, plots.MAP_LIMIT)
        return True, px, py, map_figure(state, [px, py]), gr.Accordion(open=True)

    @gpu
    @_errors
    def ui_generate(prompt, state, use_manual, x, y, decoding, seed):
        for s, b in app.stream_both(prompt, state, manual_point(use_manual, x, y), decoding, seed):
            sm = plots.meters_html(s["attributes"], labels, s["attributes"]["words"]) if s.get("done") else ""
            bm = plots.meters_html(b["attributes"], labels, b["attributes"]["words"]) if b.get("done") else ""
            yield _md_answer(s["text"]), sm, _md_answer(b["text"]), bm

    @gpu
    @_errors
    def ui_sweep(prompt, axis, state, use_manual, x, y, decoding, seed):
        res = app.sweep(prompt, axis, state, 5, manual_point(use_manual, x, y), decoding, seed)
        lo, hi = labels.get(axis, ["−", "+"])[:2]
        parts = [f"### Sweep over {axis}: {lo} → {hi}"]
        for r in res:
            a = r["attributes"]
            parts.append(f"**{axis} = {r['point'][axes.index(axis)]:+.1f}** · {a['words']} words · "
                         + " · ".join(f"{k} {a[k]:+.2f}" for k in axes)
                         + f"\n\n> {_md_answer(r['text'])}\n")
        return "\n\n".join(parts)

    @_errors
    def ui_export(state):
        prof = app.export_profile(state)
        f = Path(tempfile.mkdtemp(prefix="profile-")) / "preference-profile.json"
        f.write_text(json.dumps(prof, indent=2), encoding="utf-8")
        return str(f), json.dumps(prof, indent=2)

    @_errors
    def ui_import(text, upload, state, use_manual, x, y):
        data = upload if upload else text
        _, state = app.import_profile(data)
        _, state = app.next_pair(state)
        gr.Info(f"Profile imported: {len(app.state_of(state).clicks)} clicks restored.")
        return (state, state, *visuals(state, manual_point(use_manual, x, y)))

    # -- API events (JSON in, JSON out; one client = one session) -----------------------------------
    @_errors
    def api_next_pair(state):
        view, state = app.next_pair(state)
        return view, state

    @_errors
    def api_choose(choice, state):
        return app.choose(choice, state)

    @_errors
    def api_undo(state):
        return app.undo(state)

    @_errors
    def api_reset(state):
        return app.reset(state)

    @_errors
    def api_latent(state):
        return app.latent(state)

    @gpu
    @_errors
    def api_generate(prompt, mode, state):
        for out in app.stream(prompt, mode, state):
            yield out

    @gpu
    @_errors
    def api_sweep(prompt, axis, state):
        return {"answers": app.sweep(prompt, axis, state, 5)}

    @_errors
    def api_export(state):
        return app.export_profile(state)

    @_errors
    def api_import(profile, state):
        return app.import_profile(profile)

    @_errors
    def api_autopilot(who, n, state):
        lat = None
        for lat, state in app.autopilot(who, int(n), state):
            pass
        return lat, state

    # -- layout ----------------------------------------------------------------------------------
    with gr.Blocks(title="Few-shot steerable alignment") as demo:
        state = gr.State(None)
        saved = gr.BrowserState(None, storage_key=STORAGE_KEY)
        gr.Markdown(
            "# Few-shot steerable alignment\n"
            "Click which answer you prefer. A neural process infers your preferences as a latent **z** from your "
            "clicks (no training, one encoder pass), the map shows where you are, and a language model conditioned "
            "on z (FiLM + LoRA) answers the way you like.  \n"
            f"<small>Running **{info['bundle']}** · base `{info['base']}` ({info['parameters'] / 1e6:.1f} M parameters) "
            f"· {info['device']} · z has {info['d_z']} dimensions · {info['pool']} candidate pairs</small>",
            elem_id="header")
        with gr.Row():
            with gr.Column(scale=3):
                prompt_md = gr.Markdown(elem_id="pair-prompt")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        gr.Markdown("**Answer A**")
                        a_md = gr.Markdown(elem_id="answer-a")
                    with gr.Column():
                        gr.Markdown("**Answer B**")
                        b_md = gr.Markdown(elem_id="answer-b")
                with gr.Row():
                    btn_a = gr.Button("A is better", variant="primary", elem_id="btn-a")
                    btn_b = gr.Button("B is better", variant="primary", elem_id="btn-b")
                    btn_skip = gr.Button("Skip", elem_id="btn-skip")
                pred_md = gr.Markdown(elem_id="prediction")
                with gr.Row():
                    mode = gr.Radio(["informative", "random"], value="informative", label="Next pair",
                                    info="informative: the pair whose answer would tell the model most about you")
                    btn_next = gr.Button("Next pair", elem_id="btn-next")
                    btn_undo = gr.Button("Undo", elem_id="btn-undo")
                    btn_reset = gr.Button("Reset", variant="stop", elem_id="btn-reset")
                status_md = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                map_plot = gr.Plot(label="Behaviour map", elem_id="map")
                gr.Markdown(f"<small>{plots.MAP_KEY}<br>Click anywhere in the dotted square to steer generation "
                            "from that point (it sets the manual-steering sliders below).</small>", elem_id="map-hint")
                map_click = gr.Button("Steer from the clicked point", visible="hidden", elem_id=MAP_CLICK_ID)
                curve_plot = gr.Plot(label="Learning curve", elem_id="curve")
                gr.Markdown(f"<small>{plots.CURVE_KEY}</small>", elem_id="curve-key")

        gr.Markdown("## Live generation")
        with gr.Row():
            gen_prompt = gr.Dropdown(app.prompts, value=app.prompts[0] if app.prompts else None, allow_custom_value=True,
                                     label="Prompt (pick one or type your own)", scale=4, elem_id="gen-prompt")
            btn_gen = gr.Button("Generate", variant="primary", scale=1, elem_id="btn-generate")
        with gr.Row():
            decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding", elem_id="decoding",
                                info=f"greedy: the single most likely answer; sample: temperature {SAMPLE_TEMPERATURE}, "
                                     f"top-p {SAMPLE_TOP_P} (steered and baseline share the seed)"
                                     + (f"; both with repetition penalty {rp}" if (rp := info["decoding"]["repetition_penalty"]) != 1.0 else ""))
            seed = gr.Number(0, label="Sampling seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Steered to you** (z from your clicks, or the manual point)")
                steered_md = gr.Markdown(elem_id="steered")
                steered_meters = gr.HTML()
            with gr.Column():
                gr.Markdown("**Baseline** (the same model trained with plain DPO, no z)")
                base_md = gr.Markdown(elem_id="baseline")
                base_meters = gr.HTML()

        with gr.Accordion("Manual steering and sweep", open=False) as manual_box:
            with gr.Row():
                use_manual = gr.Checkbox(False, label="Steer with this point instead of my clicks",
                                         info="moving a slider or clicking the map turns this on", elem_id="use-manual")
                lim, step = plots.MAP_LIMIT, plots.MAP_STEP
                x = gr.Slider(-lim, lim, 0, step=step, elem_id="manual-x",
                              label=f"{axes[0]} ({' ← → '.join(labels.get(axes[0], ['', '']))})")
                y = gr.Slider(-lim, lim, 0, step=step, elem_id="manual-y",
                              label=f"{axes[1]} ({' ← → '.join(labels.get(axes[1], ['', '']))})")
            with gr.Row():
                sweep_axis = gr.Radio(axes, value=axes[0], label="Sweep along")
                btn_sweep = gr.Button("Sweep (5 answers, one batch)")
            sweep_md = gr.Markdown()

        with gr.Accordion("Autopilot: watch a simulated user click", open=False):
            with gr.Row():
                who = gr.Dropdown([*archetypes, AUTOPILOT_AT_POINT], value=archetypes[0], label="Simulated user",
                                  info="an archetype, or a user at the point set under Manual steering (or clicked on the map)",
                                  elem_id="autopilot-who")
                n_auto = gr.Slider(1, 30, 10, step=1, label="Clicks")
                btn_auto = gr.Button("Run autopilot", elem_id="btn-autopilot")

        with gr.Accordion("Your profile: export / import", open=False):
            with gr.Row():
                btn_export = gr.Button("Export profile")
                export_file = gr.File(label="Profile file")
            export_text = gr.Code(language="json", label="Profile JSON")
            with gr.Row():
                import_text = gr.Textbox(label="Paste a profile to import", lines=3)
                import_file = gr.File(label="…or upload one", file_types=[".json"], type="filepath")
                btn_import = gr.Button("Import profile")

        # hidden API plumbing
        with gr.Column(visible=False):
            api_out = gr.JSON()
            choice_in = gr.Textbox()
            prompt_in = gr.Textbox()
            mode_in = gr.Textbox(value="steered")
            axis_in = gr.Textbox(value=axes[0])
            profile_in = gr.Textbox()
            who_in = gr.Textbox()
            n_in = gr.Number(value=10, precision=0)
            api_btns = {k: gr.Button(k) for k in ("next_pair", "choose", "undo", "reset", "latent", "generate", "sweep",
                                                 "export_profile", "import_profile", "autopilot")}

        vis = [prompt_md, a_md, b_md, pred_md, map_plot, curve_plot, status_md]
        man = [use_manual, x, y]
        private = {"api_visibility": "private"}
        demo.load(ui_restore, [saved], [state, *vis], **private)
        # A click's update takes well under a second: no spinner over its nine outputs, whose
        # overlays the browser would otherwise draw and remove again on every click.
        quick = {**private, "show_progress": "hidden"}
        for btn, ch in ((btn_a, "A"), (btn_b, "B"), (btn_skip, "skip")):
            btn.click(functools.partial(ui_choose, ch), [state, *man], [state, saved, *vis], **quick)
        btn_next.click(ui_next, [state, mode, *man], [state, saved, *vis], **quick)
        btn_undo.click(ui_undo, [state, *man], [state, saved, *vis], **quick)
        btn_reset.click(ui_reset, [state, *man], [state, saved, *vis], **quick)
        mode.change(ui_mode, [mode, state], [state, saved], **private)
        btn_auto.click(ui_autopilot, [who, n_auto, state, *man], [state, saved, *vis], **private)
        # .input (the user's own moves) rather than .change, so a map click that sets all three
        # does not redraw the map three more times
        use_manual.input(ui_manual, [state, *man], [map_plot], **private)
        for c in (x, y):
            c.input(ui_slide, [state, x, y], [use_manual, map_plot], **private)
        demo.load(None, js=MAP_CLICK_HOOK_JS)
        map_click.click(ui_map_click, [state, x, y], [use_manual, x, y, map_plot, manual_box], js=MAP_CLICK_INPUTS_JS,
                        trigger_mode="always_last", **private)
        lane = {"concurrency_limit": GENERATION_CONCURRENCY, "concurrency_id": GENERATION_LANE}
        btn_gen.click(ui_generate, [gen_prompt, state, *man, decoding, seed], [steered_md, steered_meters, base_md, base_meters],
                      **lane, **private)
        btn_sweep.click(ui_sweep, [gen_prompt, sweep_axis, state, *man, decoding, seed], [sweep_md], **lane, **private)
        btn_export.click(ui_export, [state], [export_file, export_text], **private)
        btn_import.click(ui_import, [import_text, import_file, state, *man], [state, saved, *vis], **private)

        api_btns["next_pair"].click(api_next_pair, [state], [api_out, state], api_name="next_pair")
        api_btns["choose"].click(api_choose, [choice_in, state], [api_out, state], api_name="choose")
        api_btns["undo"].click(api_undo, [state], [api_out, state], api_name="undo")
        api_btns["reset"].click(api_reset, [state], [api_out, state], api_name="reset")
        api_btns["latent"].click(api_latent, [state], [api_out], api_name="latent")
        api_btns["generate"].click(api_generate, [prompt_in, mode_in, state], [api_out], api_name="generate", **lane)
        api_btns["sweep"].click(api_sweep, [prompt_in, axis_in, state], [api_out], api_name="sweep", **lane)
        api_btns["export_profile"].click(api_export, [state], [api_out], api_name="export_profile")
        api_btns["import_profile"].click(api_import, [profile_in, state], [api_out, state], api_name="import_profile")
        api_btns["autopilot"].click(api_autopilot, [who_in, n_in, state], [api_out, state], api_name="autopilot")
    return demo
