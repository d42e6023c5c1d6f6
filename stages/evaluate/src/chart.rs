//! The evaluation chart: perplexity against artifact size and against p95 latency, one
//! point per variant. Text needs a font: DejaVu Sans from the system (Debian's
//! `fonts-dejavu-core`, which .ci installs); without it the chart is drawn without text
//! rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::VariantReport;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the font once per process; false when none was found.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn span(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = values
        .clone()
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let hi = values
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.15).max(hi.abs() * 0.05).max(1e-3);
    (lo - pad).max(0.0)..hi + pad
}

/// The latency axis's label: the tokens each variant's latency was measured over (fewer
/// than asked where a model's `max_len` stopped it; "up to" where variants differ).
fn latency_label(measured: impl Iterator<Item = usize> + Clone) -> String {
    let most = measured.clone().max().unwrap_or(0);
    if most == 0 {
        return "p95 latency at batch 1 (ms): not measured (timings: false)".into();
    }
    let tokens = match measured.min() {
        Some(least) if least != most => format!("{least} to {most} tokens"),
        _ => format!("{most} tokens"),
    };
    format!("p95 latency, {tokens} at batch 1 (ms)")
}

/// The chart of `reports`.
pub fn draw(path: &Path, reports: &[VariantReport]) -> Result<(), String> {
    let text = font_ready();
    let root = BitMapBackend::new(path, (1100, 480)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let ppl = span(reports.iter().map(|r| r.perplexity));
    type Axis = fn(&VariantReport) -> f64;
    let sides: [(String, Axis); 2] = [
        ("artifact size (MB)".into(), |r| {
            r.artifact_bytes as f64 / 1e6
        }),
        (
            latency_label(reports.iter().map(|r| r.latency_tokens)),
            |r| r.latency_p95_ms,
        ),
    ];
    for (area, (label, x_of)) in panels.iter().zip(sides) {
        let label = label.as_str();
        let xs = span(reports.iter().map(x_of));
        let mut builder = ChartBuilder::on(area);
        builder.margin(20);
        if text {
            builder
                .caption(format!("perplexity vs {label}"), ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(xs, ppl.clone())
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(label).y_desc("test perplexity");
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| err(&e))?;
        for (i, r) in reports.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let at = (x_of(r), r.perplexity);
            // Latency not measured (timings: false), or a diverged model's perplexity: no
            // point, rather than one drawn at the chart's edge (the table says which).
            if !at.0.is_finite() || !at.1.is_finite() {
                continue;
            }
            chart
                .draw_series(std::iter::once(Circle::new(at, 7, color.filled())))
                .map_err(|e| err(&e))?;
            if text {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{} ({})", r.name, r.quantization),
                        at,
                        ("sans-serif", 15).into_font().color(&color),
                    )))
                    .map_err(|e| err(&e))?;
            }
        }
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_axis_names_the_tokens_measured() {
        assert_eq!(
            latency_label([200, 200].into_iter()),
            "p95 latency, 200 tokens at batch 1 (ms)"
        );
        // A model whose max_len stopped it short: what was measured, not what was asked.
        assert_eq!(
            latency_label([500, 255].into_iter()),
            "p95 latency, 255 to 500 tokens at batch 1 (ms)"
        );
        assert_eq!(
            latency_label([0, 0].into_iter()),
            "p95 latency at batch 1 (ms): not measured (timings: false)"
        );
    }
}
