//! The accuracy-per-round plot of `rso reproduce comparison` (SVG, plotters).

use crate::provenance::Meta;
use crate::reproduce::CurveRow;
use plotters::prelude::*;

/// Test accuracy against round, one line per optimizer, as an SVG document.
pub fn accuracy_svg(title: &str, p: &Meta, rows: &[CurveRow]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let rounds = rows.iter().map(|r| r.round).max().unwrap_or(1) as f64;
        let lo = rows.iter().map(|r| r.test_acc).fold(1.0, f64::min);
        let y0 = (lo - 0.05).clamp(0.0, 0.9);
        let (upper, lower) = root.split_vertically(490);
        let mut chart = ChartBuilder::on(&upper)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..rounds + 0.5, y0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("round (RSO) / epoch (SGD)")
            .y_desc("test accuracy")
            .draw()
            .map_err(err)?;
        let colors = [RGBColor(200, 60, 40), RGBColor(40, 90, 200)];
        let mut optimizers: Vec<&str> = rows.iter().map(|r| r.optimizer.as_str()).collect();
        optimizers.dedup();
        for (i, name) in optimizers.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.optimizer == *name)
                .map(|r| (r.round as f64, r.test_acc))
                .collect();
            let label = name.to_uppercase();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|pt| Circle::new(pt, 3, color.filled())),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        lower
            .draw(&Text::new(
                format!(
                    "{} · rev {} · {} · {}",
                    p.command_line(),
                    p.revision_label(),
                    p.engine.label,
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

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
