//! PNG line charts of the scaling curves (plotters).

use std::path::Path;

use plotters::prelude::*;

/// One line of a chart: its name and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// A line chart with a logarithmic x axis (mapping counts span 1 to 1M).
pub fn log_x_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x_max, mut y_max) = (1.0f64, 0.0f64);
    for (x, y) in points {
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1.0f64..x_max * 1.5).log_scale(),
            0.0f64..y_max * 1.15 + f64::EPSILON,
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
