"""Render the README's charts from the stored H100 results into docs/img/ (``make readme-charts``).

    python scripts/readme_charts.py [--results data/results] [--out docs/img] [--html]

Three charts, each p50 time per call vs tokens with the roofline floor (minimum bytes, or FLOPs, over the H100's
measured peaks), built by ``dsv4lab.lab.viz.stored_time_figure`` from ``data/results/h100/*.jsonl``:

- ``mhc_kernels_h100.png``: TileLang mHC kernels (#43905) vs torch eager, Flash shapes;
- ``mtp_norm_h100.png``: the fused MTP input RMSNorm (#43746) vs the eager and compiled ops it replaced;
- ``moe_experts_h100.png``: the grouped fp8 DeepGEMM experts vs the eager MXFP4 reference (#44367 study).

PNG export needs plotly's kaleido and a Chromium (``pip install kaleido``; ``apt-get install chromium``). Without
them, or with ``--html``, each chart is written as a standalone HTML file instead (plotly.js inline, opens offline).
A chart whose results file is missing is skipped with a message; the exit status is 0 if at least one was written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4lab.config import get_config  # noqa: E402
from dsv4lab.lab import results, roofline, viz  # noqa: E402

WIDTH, HEIGHT = 900, 420
MAX_PNG_BYTES = 150_000


def _floor(op: str, peaks, **shape):
    return (lambda t: viz.floor_us(roofline.cost(op, T=t, **shape), peaks)) if peaks else None


def mhc_kernels(root: Path, peaks):
    df = results.load(root=root, slug="h100", experiment="pr43905_mhc_direct", strict=False)
    if not len(df):
        return None
    df = df[(df.variant == "eager") & df.get("norm_weight", df.variant.map(lambda _: None)).ne(False)]
    d = get_config("flash").hidden_size
    fig = viz.stored_time_figure(df[df.backend.isin(["tilelang", "torch"])], "mhc_post", preset="flash",
                                 mode="cuda-events", floor_us=_floor("mhc_post", peaks, D=d),
                                 floor_name="roofline floor (min bytes / copy BW)",
                                 title="mHC post (4 residual streams), Flash: TileLang kernel vs torch eager")
    return fig


def mtp_norm(root: Path, peaks):
    df = results.load(root=root, slug="h100", experiment="pr43746_mtp_norm", strict=False)
    if not len(df):
        return None
    c = get_config("flash")
    df = df[df.variant.isin(["before_eager", "before_compiled", "after"])]
    return viz.stored_time_figure(df, "mtp_input_rmsnorm", preset="flash", mode="cuda-graph",
                                  floor_us=_floor("mtp_input_rmsnorm", peaks, D=c.hidden_size, n=c.hc_mult),
                                  floor_name="roofline floor (bytes / copy BW)",
                                  title="MTP input norms (#43746), Flash, CUDA graph: one fused Triton kernel vs eager "
                                        "and compiled")


def moe_experts(root: Path, peaks):
    df = results.load(root=root, slug="h100", experiment="pr44367_megamoe", strict=False)
    if not len(df):
        return None
    c = get_config("flash")
    df = df[df.variant.isin(["grouped_fp8", "eager_moe_fp4"])]
    return viz.stored_time_figure(df, "moe_experts", preset="flash", mode="cuda-events",
                                  floor_us=_floor("moe_experts", peaks, D=c.hidden_size, I=c.moe_intermediate_size,
                                                  E=c.n_routed_experts, k=c.num_experts_per_tok,
                                                  n_shared=c.n_shared_experts),
                                  floor_name="roofline floor (max of bytes / copy BW, FLOPs / fp8 rate)",
                                  title="MoE experts, Flash (256 x MXFP4, top-6 + shared): grouped fp8 DeepGEMM vs eager")


CHARTS = {"mhc_kernels_h100": mhc_kernels, "mtp_norm_h100": mtp_norm, "moe_experts_h100": moe_experts}


def _png_export_available() -> str | None:
    """None if PNG export works here, else why not."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "kaleido is not installed (pip install kaleido)"
    return None


def write(fig, out: Path, name: str, html: bool) -> Path:
    fig.update_layout(width=WIDTH, height=HEIGHT, template="plotly_white")
    if html:
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    path = out / f"{name}.png"
    fig.write_image(path, width=WIDTH, height=HEIGHT, scale=1)
    if path.stat().st_size > MAX_PNG_BYTES:
        print(f"warning: {path} is {path.stat().st_size / 1e3:.0f} KB (> {MAX_PNG_BYTES / 1e3:.0f} KB)")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "data" / "results", help="results root (default data/results)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="output folder (default docs/img)")
    ap.add_argument("--html", action="store_true", help="write standalone HTML instead of PNG")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    html = args.html
    if not html:
        why = _png_export_available()
        if why:
            print(f"PNG export unavailable ({why}): writing standalone HTML instead")
            html = True
    peaks = roofline.load_peaks("h100", root=args.results)
    written = 0
    for name, build in CHARTS.items():
        fig = build(args.results, peaks)
        if fig is None:
            print(f"skip {name}: its results file is not in {args.results}/h100")
            continue
        try:
            path = write(fig, args.out, name, html)
        except Exception as e:  # kaleido present but no Chromium: fall back to HTML for this and later charts
            if html:
                raise
            print(f"PNG export failed ({type(e).__name__}: {str(e).splitlines()[0]}); writing standalone HTML instead")
            html = True
            path = write(fig, args.out, name, html)
        written += 1
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({path.stat().st_size / 1e3:.0f} KB)")
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
