//! Plots (SVG, plotters): a study's test accuracy, mean with a ±sd band per setting, against
//! rounds and against cumulative forward-equivalents (`rso study collect`, `rso reproduce
//! comparison`).

use crate::provenance::Meta;
use plotters::prelude::*;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}

/// One setting of a study: per round `(round, mean cumulative forward-equivalents, mean test
/// accuracy, sd of test accuracy)`.
#[derive(Clone, Debug)]
pub struct Band {
    /// The setting's label.
    pub label: String,
    /// Its points, by round.
    pub points: Vec<(f64, Option<f64>, f64, f64)>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(200, 60, 40),
    RGBColor(40, 90, 200),
    RGBColor(30, 150, 70),
    RGBColor(150, 60, 170),
    RGBColor(220, 140, 20),
    RGBColor(60, 60, 60),
];

/// A study's test accuracy, mean with a ±sd band per setting: against rounds (left) and against
/// cumulative forward-equivalents (right), as an SVG document.
pub fn band_svg(title: &str, p: &Meta, bands: &[Band]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (upper, lower) = root.split_vertically(530);
        let upper = upper.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (left, right) = upper.split_horizontally(600);
        // Rounds are whole numbers: no label between them.
        let whole = |v: &f64| {
            if (v - v.round()).abs() < 1e-9 {
                short(*v)
            } else {
                String::new()
            }
        };
        band_panel(&left, bands, "round", |pt| Some(pt.0), &whole)?;
        // Methods differ by orders of magnitude in work per round: a log axis (plotted as
        // log10 on a linear one).
        band_panel(
            &right,
            bands,
            "cumulative forward-equivalents (log scale)",
            |pt| pt.1.filter(|f| *f > 0.0).map(f64::log10),
            &|v| format!("{:.1e}", 10f64.powf(*v)),
        )?;
        lower
            .draw(&Text::new(
                format!(
                    "{} · rev {} · {}",
                    p.command_line(),
                    p.revision_label(),
                    p.ended
                ),
                (10, 10),
                ("sans-serif", 11).into_font().color(&RGBColor(90, 90, 90)),
            ))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// `v` with at most two decimals and no trailing zeros (axis labels).
fn short(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One panel of [`band_svg`], its x taken from each point by `x` and labelled by `label`.
fn band_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    bands: &[Band],
    x_desc: &str,
    x: impl Fn(&(f64, Option<f64>, f64, f64)) -> Option<f64>,
    label: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    let xs: Vec<f64> = bands
        .iter()
        .flat_map(|b| b.points.iter().filter_map(&x))
        .collect();
    let (x0, x1) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let lo = bands
        .iter()
        .flat_map(|b| b.points.iter().map(|p| p.2 - p.3))
        .fold(1.0, f64::min);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (lo - 0.02).clamp(0.0, 0.95)..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("test accuracy (mean ± sd)")
        .x_label_formatter(label)
        .x_labels(8)
        .draw()
        .map_err(err)?;
    for (i, band) in bands.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64, f64)> = band
            .points
            .iter()
            .filter_map(|p| x(p).map(|xv| (xv, p.2, p.3)))
            .collect();
        let mut outline: Vec<(f64, f64)> = pts.iter().map(|&(a, m, s)| (a, m + s)).collect();
        outline.extend(pts.iter().rev().map(|&(a, m, s)| (a, m - s)));
        chart
            .draw_series(std::iter::once(Polygon::new(
                outline,
                color.mix(0.2).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(a, m, _)| (a, m)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(band.label.clone())
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
