//! A hand-written SVG with two charts: grouped bars of TTFT p50/p90/p99 per run, and the
//! median TTFT over request start time, one line per run.

use std::fmt::Write as _;

use super::stats::RunStats;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 380.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const PERCENTILE_COLORS: [&str; 3] = ["#4e79a7", "#f28e2b", "#e15759"];
const RUN_COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Escapes text for SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A "nice" axis maximum and tick step (1, 2 or 5 times a power of ten) covering `max`.
pub fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws the frame, y grid and y labels of a panel; returns the y mapping's (max, top, bottom).
fn y_axis(out: &mut String, top: f64, bottom: f64, right: f64, max: f64, label: &str) -> f64 {
    let (ymax, step) = nice_axis(max);
    let mut v = 0.0;
    while v <= ymax + step * 1e-9 {
        let y = bottom - (v / ymax) * (bottom - top);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        v += step;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{bottom:.1}" x2="{right:.1}" y2="{bottom:.1}" stroke="#333"/><line x1="{LEFT}" y1="{top:.1}" x2="{LEFT}" y2="{bottom:.1}" stroke="#333"/><text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle" class="axis">{}</text>"##,
        (top + bottom) / 2.0,
        escape(label)
    );
    ymax
}

/// Renders the charts of `runs` (of a `workload`) as a standalone SVG document.
pub fn render(workload: &str, runs: &[RunStats]) -> String {
    let height = 2.0 * PANEL + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"##
    );
    out.push_str(
        "<style>.tick{font-size:11px;fill:#555}.axis{font-size:12px;fill:#333}.title{font-size:15px;font-weight:bold;fill:#222}.label{font-size:11px;fill:#222}</style>\n",
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="24" class="title">TTFT per policy — {} (simulated time, ms)</text>"##,
        escape(workload)
    );

    // Panel 1: grouped bars.
    let (top, bottom) = (50.0, PANEL - 40.0);
    let max = runs
        .iter()
        .filter_map(|r| r.ttft.map(|t| t.p99 * 1000.0))
        .fold(0.0, f64::max);
    let ymax = y_axis(&mut out, top, bottom, WIDTH - RIGHT, max, "TTFT (ms)");
    let n = runs.len().max(1) as f64;
    let group = (WIDTH - RIGHT - LEFT) / n;
    let bar = group * 0.8 / 3.0;
    let longest = runs
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0) as f64;
    let rotate = longest * 6.5 > group;
    for (i, r) in runs.iter().enumerate() {
        let gx = LEFT + group * i as f64;
        if let Some(t) = r.ttft {
            for (k, v) in [t.p50, t.p90, t.p99].into_iter().enumerate() {
                let h = (v * 1000.0 / ymax) * (bottom - top);
                let x = gx + group * 0.1 + bar * k as f64;
                let _ = writeln!(
                    out,
                    r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} p{}: {:.0} ms</title></rect>"##,
                    bottom - h,
                    bar * 0.92,
                    PERCENTILE_COLORS[k],
                    escape(&r.name),
                    [50, 90, 99][k],
                    v * 1000.0
                );
            }
        }
        let cx = gx + group / 2.0;
        if rotate {
            let _ = writeln!(
                out,
                r##"<text transform="translate({cx:.1},{:.1}) rotate(-20)" text-anchor="end" class="label">{}</text>"##,
                bottom + 14.0,
                escape(&r.name)
            );
        } else {
            let _ = writeln!(
                out,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" class="label">{}</text>"##,
                bottom + 16.0,
                escape(&r.name)
            );
        }
    }
    for (k, name) in ["p50", "p90", "p99"].iter().enumerate() {
        let x = WIDTH - RIGHT - 170.0 + 56.0 * k as f64;
        let _ = writeln!(
            out,
            r##"<rect x="{x:.1}" y="34" width="12" height="12" fill="{}"/><text x="{:.1}" y="44" class="label">{name}</text>"##,
            PERCENTILE_COLORS[k],
            x + 16.0
        );
    }

    // Panel 2: median TTFT over start time.
    let (top, bottom) = (PANEL + 40.0, 2.0 * PANEL + 10.0);
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="{:.1}" class="title">Median TTFT over request start time</text>"##,
        top - 12.0
    );
    let max_y = runs
        .iter()
        .flat_map(|r| r.ttft_timeline.iter().map(|p| p[1] * 1000.0))
        .fold(0.0, f64::max);
    let max_x = runs
        .iter()
        .flat_map(|r| r.ttft_timeline.iter().map(|p| p[0]))
        .fold(0.0, f64::max);
    // The legend gets its own column right of the plot.
    let legend_w = (longest * 6.5 + 40.0).clamp(80.0, 260.0);
    let right = WIDTH - RIGHT - legend_w;
    let ymax = y_axis(&mut out, top, bottom, right, max_y, "median TTFT (ms)");
    let (xmax, xstep) = nice_axis(max_x);
    let plot_w = right - LEFT;
    let mut v = 0.0;
    while v <= xmax + xstep * 1e-9 {
        let x = LEFT + v / xmax * plot_w;
        let _ = writeln!(
            out,
            r##"<text x="{x:.1}" y="{:.1}" text-anchor="middle" class="tick">{}</text>"##,
            bottom + 16.0,
            fmt_tick(v)
        );
        v += xstep;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="axis">request start (simulated s)</text>"##,
        LEFT + plot_w / 2.0,
        bottom + 34.0
    );
    for (i, r) in runs.iter().enumerate() {
        let color = RUN_COLORS[i % RUN_COLORS.len()];
        let pts: Vec<String> = r
            .ttft_timeline
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + p[0] / xmax * plot_w,
                    bottom - (p[1] * 1000.0 / ymax) * (bottom - top)
                )
            })
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                out,
                r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"##,
                pts.join(" "),
                escape(&r.name)
            );
        }
        let ly = top + 8.0 + 16.0 * i as f64;
        let lx = right + 14.0;
        let _ = writeln!(
            out,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}" class="label">{}</text>"##,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&r.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn nice_axes() {
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(87.0), (100.0, 20.0));
        assert_eq!(nice_axis(1234.0), (1500.0, 500.0));
        assert_eq!(nice_axis(950.0), (1000.0, 200.0));
        assert_eq!(nice_axis(5.0), (5.0, 1.0));
    }

    #[test]
    fn renders_bars_and_lines_per_run_with_escaped_names() {
        let r = sample_report();
        let svg = render(r.settings.load_name(), &r.runs);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Three bars per run, plus the three legend swatches.
        assert_eq!(svg.matches("<rect x=").count(), 2 * 3 + 3);
        assert!(svg.contains("round&lt;robin&gt;"));
        assert!(!svg.contains("round<robin>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
