//! One SVG per cell: latency by percentile, one line per target.
//!
//! The x axis is drawn as HdrHistogram plots usually are, in "nines":
//! x = -log10(1 - p), so 0 %, 90 %, 99 %, 99.9 % and 99.99 % are evenly
//! spaced and the tail gets as much room as the body. The y axis is
//! logarithmic too, so a slow maximum does not flatten the medians.
//!
//! plotters is built without its `ttf` feature: the SVG backend then writes
//! text as `<text>` elements for the viewer to render and sizes labels with
//! a rough estimate, which is all an SVG needs.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{max_nines, CellSummary};
use crate::targets::TargetKind;

const SIZE: (u32, u32) = (960, 560);

fn color(kind: TargetKind) -> RGBColor {
    match kind {
        TargetKind::Direct => RGBColor(40, 40, 40),
        TargetKind::DirectUnix => RGBColor(127, 127, 127),
        TargetKind::Tollgate => RGBColor(31, 119, 180),
        TargetKind::TollgateUnixUpstream => RGBColor(214, 39, 40),
        TargetKind::TollgateMetrics => RGBColor(148, 103, 189),
        TargetKind::TollgateNopool => RGBColor(23, 190, 207),
        TargetKind::TollgateReadiness => RGBColor(188, 189, 34),
        TargetKind::Pgbouncer => RGBColor(255, 127, 14),
        TargetKind::TollgateTx => RGBColor(23, 190, 207),
        TargetKind::PgbouncerTx => RGBColor(140, 86, 75),
        TargetKind::Relay => RGBColor(44, 160, 44),
    }
}

/// Label for a chart position in nines: 0 → "0%", 1 → "90%", 3 → "99.9%".
pub fn nines_label(x: f64) -> String {
    let n = x.round() as i32;
    if (x - n as f64).abs() > 1e-6 || n < 0 {
        return String::new();
    }
    match n {
        0 => "0%".to_owned(),
        1 => "90%".to_owned(),
        2 => "99%".to_owned(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// Writes the chart for one cell to `path`.
pub fn write(cell: &CellSummary, path: &Path) -> Result<(), String> {
    let series: Vec<(TargetKind, Vec<(f64, f64)>)> = cell
        .targets
        .iter()
        .filter(|t| !t.percentile_curve.is_empty())
        .map(|t| {
            let points = t
                .percentile_curve
                .iter()
                .map(|&(p, us)| (-(1.0 - p / 100.0).log10(), (us.max(1)) as f64))
                .collect();
            (t.target, points)
        })
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let count = cell
        .targets
        .iter()
        .filter_map(|t| t.latency.as_ref().map(|l| l.count))
        .min()
        .unwrap_or(0);
    let x_max = max_nines(count);
    let ys = series.iter().flat_map(|(_, s)| s.iter().map(|&(_, y)| y));
    let (y_min, y_max) = ys.fold((f64::MAX, 1.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (y_min, y_max) = ((y_min * 0.8).max(1.0), y_max * 1.25);

    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&cell.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            // One label per nine: plotters then puts ticks on whole numbers.
            .x_labels(x_max.floor() as usize + 1)
            .x_desc("percentile")
            .y_desc("latency (µs, log scale)")
            .x_label_formatter(&|x| nines_label(*x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (kind, points) in &series {
            let c = color(*kind);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
                .label(kind.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("chart {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
        assert_eq!(nines_label(1.5), "");
    }
}
