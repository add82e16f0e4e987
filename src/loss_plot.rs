//! The loss curve of a run as an SVG image: a plain line chart with its
//! axes labelled, which any browser opens. Written by `samtrain local` and
//! `samtrain demo` beside their other outputs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Writes `points` (step, loss) to `path`; `title` heads the chart.
pub fn write_svg(path: &Path, title: &str, points: &[(u64, f64)]) -> Result<()> {
    std::fs::write(path, svg(title, points))
        .with_context(|| format!("cannot write the loss curve {}", path.display()))
}

/// The chart as SVG text. An empty series gives an empty frame.
pub fn svg(title: &str, points: &[(u64, f64)]) -> String {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    let (x_lo, x_hi) = bounds(finite.iter().map(|p| p.0));
    let (y_lo, y_hi) = bounds(finite.iter().map(|p| p.1));
    let y_lo = y_lo.min(0.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + (v - x_lo) / (x_hi - x_lo) * plot_w;
    let y = |v: f64| TOP + (1.0 - (v - y_lo) / (y_hi - y_lo)) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for i in 0..=4 {
        let fy = y_lo + (y_hi - y_lo) * f64::from(i) / 4.0;
        let py = y(fy);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{fy:.3}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
        let fx = x_lo + (x_hi - x_lo) * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"#,
            x(fx),
            HEIGHT - BOTTOM + 18.0,
            fx
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    if !finite.is_empty() {
        let line: Vec<String> = finite
            .iter()
            .map(|&(sx, sy)| format!("{:.1},{:.1}", x(sx), y(sy)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            line.join(" ")
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The range of `values`, widened when it is a single point.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_spans_the_plot_area() {
        let s = svg("loss <demo>", &[(1, 4.0), (2, 2.0), (3, 1.0)]);
        assert!(s.contains("loss &lt;demo&gt;"));
        // First point at the left edge, last at the right; loss 4.0 at the
        // top of the frame (TOP), the y range starting at 0.
        assert!(
            s.contains(r#"points="70.0,40.0 385.0,195.0 700.0,272.5""#),
            "{s}"
        );
    }

    #[test]
    fn empty_and_flat_series_still_draw_a_frame() {
        assert!(!svg("x", &[]).contains("polyline"));
        assert!(svg("x", &[(5, 1.0)]).contains("polyline"));
    }
}
