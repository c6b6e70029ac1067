//! A line chart of gaps, drawn with plotters (SVG): one line per series
//! over named points on the x axis, the gap on a log scale.

use std::path::Path;

/// One line per variant of `gap` (ms) against `x`, log-scaled gap.
pub fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    xs: &[String],
    lines: &[(&str, Vec<f64>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = lines
        .iter()
        .flat_map(|l| l.1.iter().copied())
        .fold(10.0f64, f64::max)
        * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            -0.5f64..(xs.len() as f64 - 0.5),
            (1.0f64..y_max).log_scale(),
        )?;
    let names = xs.to_vec();
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("client-seen gap of the worst move, ms")
        .x_labels(xs.len())
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .draw()?;
    for (k, (name, ys)) in lines.iter().enumerate() {
        let color = [BLUE, RGBColor(230, 120, 0), RED][k % 3].to_rgba();
        let pts: Vec<(f64, f64)> = ys
            .iter()
            .enumerate()
            .map(|(i, y)| (i as f64, y.max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
