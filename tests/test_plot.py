"""Trace.plot(): each kind rendered to PNG from a real trace, read back and checked pixel by pixel."""
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

import gradtrace  # noqa: E402
from gradtrace.render import plot as gplot  # noqa: E402
from zoo import DetachedBranch, LoRAModel, _features  # noqa: E402


def two_pass_trace(model, keep_grads=True):
    """X: .backward(); Y: autograd.grad; and their inner product."""
    with gradtrace.watch(model, keep_grads=keep_grads) as trace:
        with trace.pass_("X"):
            model(_features(0)).pow(2).mean().backward()
        with trace.pass_("Y"):
            torch.autograd.grad(model(_features(1)).sum(), list(model.parameters()), allow_unused=True)
        if keep_grads:
            trace.diff("X", "Y")
    return trace


def healthy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))


class Deep(nn.Module):
    """100 layers; the gradient is cut after layer ``cut`` when given."""

    def __init__(self, n=100):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.head = nn.Linear(4, 1)

    def forward(self, x, cut=None):
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x)) + x
            if i == cut:
                x = x.detach()
        return self.head(x)


def png(figure, tmp_path, name):
    path = tmp_path / f"{name}.png"
    figure.savefig(path, dpi=gplot.DPI)
    return matplotlib.image.imread(path)


def pixels_of(image, hex_color, figure=None, tolerance=0.06, axes=None):
    """How many pixels are within ``tolerance`` of ``hex_color``: inside ``axes`` (an index), or inside
    every axes of ``figure`` when given (the legend and title are outside), else anywhere."""
    rgb = torch.tensor(matplotlib.colors.to_rgb(hex_color))
    img = torch.from_numpy(image[..., :3].copy())
    if figure is None:
        return int(((img - rgb).abs() <= tolerance).all(-1).sum())
    height, count = img.shape[0], 0
    for ax in figure.axes if axes is None else [figure.axes[axes]]:
        box = ax.get_window_extent()
        part = img[int(height - box.y1):int(height - box.y0), int(box.x0):int(box.x1)]
        count += int(((part - rgb).abs() <= tolerance).all(-1).sum())
    return count


def assert_not_blank(image, size):
    assert image.shape[:2] == (size[1], size[0])  # rows, columns
    assert (image[..., :3] < 0.9).any(-1).mean() > 0.01  # more than a white page


@pytest.mark.parametrize("kind", ["flow", "coverage"])
def test_missing_module_is_marked_and_healthy_run_has_no_mark(kind, tmp_path):
    broken = two_pass_trace(DetachedBranch(), keep_grads=False)
    assert broken.passes["X"].missing == {"right.weight", "right.bias"}
    figure = broken.plot(tmp_path / f"{kind}.png", kind=kind)
    image = matplotlib.image.imread(tmp_path / f"{kind}.png")
    width, height = figure.get_size_inches() * gplot.DPI
    assert_not_blank(image, (round(width), round(height)))
    assert pixels_of(image, gplot.MISSING_COLOR, figure) > 30
    healthy = two_pass_trace(healthy_model(), keep_grads=False)
    assert all(not p.missing for p in healthy.passes.values())
    figure = healthy.plot(kind=kind)
    assert pixels_of(png(figure, tmp_path, "healthy"), gplot.MISSING_COLOR, figure) == 0


def test_flow_title_names_what_was_not_reached():
    figure = two_pass_trace(DetachedBranch(), keep_grads=False).plot()
    assert "not reached in 'X': right" in figure.axes[0].get_title()


def test_exactly_zero_is_its_own_state_in_the_coverage_map(tmp_path):
    model = LoRAModel()  # lora_B starts at zero: every lora_A gradient is exactly zero on the first step
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(_features(0)).pow(2).mean().backward()
    assert trace.passes["X"].zero == {"q.lora_A", "v.lora_A"}
    figure = trace.plot(kind="coverage")
    image = png(figure, tmp_path, "lora")
    assert pixels_of(image, gplot.ZERO_COLOR, figure) > 30
    assert pixels_of(image, gplot.MISSING_COLOR, figure) == 0


def test_nan_module_gets_a_mark_not_a_blank():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.full((2, 3), float("nan"))).sum().backward()
    nonfinite = {n.rsplit(".", 1)[0] for n, r in trace.passes["X"].records.items() if r.nonfinite}
    assert nonfinite == {"0", "2"}  # both layers hold NaN (the last bias's gradient does not depend on x)
    data, strip = trace.plot().axes
    stars = [line for line in strip.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in stars] == [[0.0, 1.0]]
    assert "NaN/Inf (below its bar)" in [t.get_text() for t in data.get_legend().get_texts()]


def test_inner_product_contributions(tmp_path):
    trace = two_pass_trace(DetachedBranch())
    (summary,) = trace.inner_products
    figure = trace.plot(tmp_path / "inner.png", kind="inner")
    image = matplotlib.image.imread(tmp_path / "inner.png")
    assert_not_blank(image, tuple(round(v) for v in figure.get_size_inches() * gplot.DPI))
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [t["param"] for t in summary["top"]]
    bars = sorted((p.get_y(), p.get_width()) for p in ax.patches)
    assert [w for _, w in bars] == pytest.approx([t["contribution"] for t in summary["top"]])
    with pytest.raises(gradtrace.GradtraceError, match="keep_grads=True"):
        two_pass_trace(DetachedBranch(), keep_grads=False).plot(kind="inner")


@pytest.mark.slow
def test_deep_model_is_readable(tmp_path):
    """100 layers: tick labels are capped and never overlap; the cut layers are marked."""
    model = Deep()
    with gradtrace.watch(model) as trace:
        for step, cut in enumerate((None, 40)):
            with trace.pass_(f"step-{step}"):
                model(torch.randn(3, 4), cut=cut).sum().backward()
            model.zero_grad()
    assert trace.passes["step-1"].missing == {f"layers.{i}.{w}" for i in range(41) for w in ("weight", "bias")}
    for kind in ("flow", "coverage"):
        figure = trace.plot(tmp_path / f"deep_{kind}.png", kind=kind)
        figure.canvas.draw()
        ax = figure.axes[-1]  # the module names sit under the lowest axes (flow: its state strip)
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert 10 <= len(labels) <= gplot.MAX_TICKS
        boxes = [t.get_window_extent() for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert labels[-1].get_text() == "head"
        image = matplotlib.image.imread(tmp_path / f"deep_{kind}.png")
        assert pixels_of(image, gplot.MISSING_COLOR, figure) > 100
    assert "layers.0..40" in trace.plot(kind="flow").axes[0].get_title()


@pytest.mark.slow
def test_loaded_trace_plots_the_same_image(tmp_path):
    trace = two_pass_trace(DetachedBranch())
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    for kind in gplot.KINDS:
        live = png(trace.plot(kind=kind), tmp_path, f"live_{kind}")
        again = png(loaded.plot(kind=kind), tmp_path, f"loaded_{kind}")
        assert (live == again).all(), kind


def test_newest_passes_only_and_pass_selection():
    model = healthy_model()
    with gradtrace.watch(model) as trace:
        for _ in range(12):
            model(torch.randn(2, 6)).sum().backward()  # unlabelled: backward-1 ... backward-12
    figure = trace.plot()
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [
        f"backward-{i}" for i in range(5, 13)]
    assert "newest 8 of 12 passes" in figure.axes[0].get_title()
    assert trace.plot(passes=["backward-1"]).axes[0].get_legend().get_texts()[0].get_text() == "backward-1"
    with pytest.raises(gradtrace.GradtraceError, match="no pass named 'Z'"):
        trace.plot(passes=["Z"])


def test_backend_and_pyplot_left_alone():
    # read the raw setting: matplotlib.get_backend() would itself import pyplot to resolve it
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    for kind in gplot.KINDS:
        two_pass_trace(DetachedBranch()).plot(kind=kind)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_errors(monkeypatch, tmp_path):
    trace = two_pass_trace(DetachedBranch(), keep_grads=False)
    with pytest.raises(gradtrace.GradtraceError, match="kind='pie' is not one of flow, coverage, inner"):
        trace.plot(kind="pie")
    with pytest.raises(gradtrace.GradtraceError, match="cannot write the plot"):
        trace.plot(tmp_path / "no_such_dir" / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    # gradtrace is on no package index: the hint names matplotlib itself (pip install "gradtrace[plot]" failed)
    with pytest.raises(gradtrace.GradtraceError, match=r"needs matplotlib: pip install matplotlib") as info:
        trace.plot()
    assert '"gradtrace[plot]"' not in str(info.value)


@pytest.mark.parametrize("layers", [3, 60], ids=["bars", "markers"])
def test_flow_marks_sit_on_their_own_strip_never_among_the_data(layers, tmp_path):
    """Issue 25: the "not reached" row was drawn inside the log axis (~5e-5), on top of real points,
    and line mode joined categorical modules with zig-zag lines."""
    model = Deep(layers)
    with gradtrace.watch(model) as trace:
        for step, cut in enumerate((None, 1)):
            with trace.pass_(f"step-{step}"):
                model(torch.randn(3, 4) * 1e-3, cut=cut).sum().backward()  # small norms: near where marks were
            model.zero_grad()
    figure = trace.plot(kind="flow")
    data, strip = figure.axes
    image = png(figure, tmp_path, "flow")
    assert pixels_of(image, gplot.MISSING_COLOR, figure, axes=0) == 0  # no mark among the data
    assert pixels_of(image, gplot.MISSING_COLOR, figure, axes=1) > 30
    assert strip.get_window_extent().y1 <= data.get_window_extent().y0 + 1  # the strip lies below
    points = [line for line in data.get_lines() if line.get_marker() == "o"]
    if layers == 60:  # marker mode: one series per pass, no line joining two modules
        assert len(points) == 2 and all(line.get_linestyle() == "None" for line in points)
    marks = [line for line in strip.get_lines() if line.get_marker() == "x"]
    reached_x = {x for line in points for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if y == y}
    assert marks and all(0 <= y < 2 for line in marks for y in line.get_ydata())
    cut_modules = {"layers.0", "layers.1"}
    names = list(gplot._modules(trace.params))
    assert {names[round(x)] for line in marks for x in line.get_xdata()} == cut_modules
    drawn = reached_x if layers == 60 else {round(b.get_x() + b.get_width() / 2) for b in data.patches
                                            if b.get_height() > 0}
    modules = gplot._modules(trace.params)
    nonzero = {m for m in names for p in trace.passes.values()
               if gplot._module_norm(p, modules[m])[1] == gplot.OK and gplot._module_norm(p, modules[m])[0] > 0}
    assert drawn and {names[round(x)] for x in drawn} == nonzero  # every nonzero module, on the data axes


def test_a_healthy_flow_plot_has_no_state_strip():
    figure = two_pass_trace(healthy_model(), keep_grads=False).plot(kind="flow")
    assert len(figure.axes) == 1
